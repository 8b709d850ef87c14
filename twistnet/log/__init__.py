"""
The twistnet-log service: every line a client sends lands in the log file, none lost.

L{sink} holds the shared file (appends, fsync, backpressure) as glue around IO-free parts:
L{formats} (records), L{rotation} (batch cuts, names, pruning) and L{retry} (the disk-full
policy). L{protocol} splits each connection's input into lines, L{tap} holds the twistd
options and service.
"""

from twistnet.log.tap import Options, makeService

__all__ = ["Options", "makeService"]
