"""
The twistnet-log service: every line a client sends lands in the log file, none lost.

L{sink} is what the connections share: records, and backpressure while the disk refuses
writes (L{retry} is its policy). L{logfile} is the file itself: whole-batch appends, fsync,
rotation (L{rotation} cuts batches, names and prunes) and reopening. L{formats} makes
records, L{protocol} splits each connection's input into lines, L{tap} holds the twistd
options and service.
"""

from twistnet.log.tap import Options, makeService

__all__ = ["Options", "makeService"]
