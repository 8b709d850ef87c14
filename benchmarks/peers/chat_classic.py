"""
The classic Twisted tutorial chat: a LineOnlyReceiver per client, the list of clients in the
factory, /NAME and /EXIT, join and leave announcements; a line goes to everyone else.
No limits of any kind (no line-length answer, rate, send queue or client cap).
"""

import sys

from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineOnlyReceiver


class Chat(LineOnlyReceiver):
    def connectionMade(self):
        self.factory.counter += 1
        self.name = f"guest-{self.factory.counter}"
        self.factory.clients.append(self)
        self.sendLine(f"Welcome, {self.name}! /NAME new to rename, /EXIT to leave.".encode())
        self.broadcast(f"* {self.name} joined".encode())

    def connectionLost(self, reason):
        if self in self.factory.clients:
            self.factory.clients.remove(self)
            self.broadcast(f"* {self.name} left".encode())

    def lineReceived(self, line):
        text = line.decode("utf-8", "replace")
        if text.startswith("/NAME "):
            old, self.name = self.name, text[6:].strip()
            self.broadcast(f"* {old} is now {self.name}".encode())
        elif text.startswith("/EXIT"):
            self.sendLine(b"Bye!")
            self.transport.loseConnection()
        else:
            self.broadcast(f"{self.name}: {text}".encode())

    def broadcast(self, message):
        for client in self.factory.clients:
            if client is not self:
                client.sendLine(message)


class ChatFactory(protocol.Factory):
    protocol = Chat

    def __init__(self):
        self.clients = []
        self.counter = 0


port = reactor.listenTCP(int(sys.argv[1]), ChatFactory(), interface="127.0.0.1")
print(f"classic-chat listening on 127.0.0.1:{port.getHost().port}", flush=True)
reactor.run()
