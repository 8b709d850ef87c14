"""
The twistnet-log service: every line a client sends lands in the log file, none lost.

L{sink} holds the shared file (formatting, rotation, fsync, backpressure), L{protocol} the
per-connection line splitting, L{tap} the twistd options and service.
"""

from twistnet.log.tap import Options, makeService

__all__ = ["Options", "makeService"]
