"""Twisted's own echo: C{twisted.protocols.wire.Echo} on a plain listenTCP, as in the docs."""

import sys

from twisted.internet import protocol, reactor
from twisted.protocols.wire import Echo

port = reactor.listenTCP(
    int(sys.argv[1]), protocol.Factory.forProtocol(Echo), interface="127.0.0.1"
)
print(f"wire-echo listening on 127.0.0.1:{port.getHost().port}", flush=True)
reactor.run()
