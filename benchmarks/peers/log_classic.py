"""
The classic Twisted line logger: a LineReceiver whose factory opens the file in
startFactory and writes each line to it (Python's buffered file: lines reach the OS 8 KiB
at a time, and the last ones only at shutdown).
"""

import sys

from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineReceiver


class LoggingProtocol(LineReceiver):
    delimiter = b"\n"

    def lineReceived(self, line):
        self.factory.fp.write(line.decode("utf-8", "replace") + "\n")


class LogfileFactory(protocol.Factory):
    protocol = LoggingProtocol

    def __init__(self, fileName):
        self.file = fileName

    def startFactory(self):
        self.fp = open(self.file, "a")

    def stopFactory(self):
        self.fp.close()


port = reactor.listenTCP(int(sys.argv[1]), LogfileFactory(sys.argv[2]), interface="127.0.0.1")
print(f"classic-log listening on 127.0.0.1:{port.getHost().port}", flush=True)
reactor.run()
