"""
The echo service, RFC 862: every byte received is sent back, over TCP and UDP.

TCP echo applies backpressure: the transport is registered as its own streaming producer
(as C{twisted/protocols/portforward.py} does), so a client that sends without reading stops
being read once its replies back up, and server memory stays bounded by the transport's
buffer instead of growing with everything the client pushes (Twisted's C{wire.Echo} grows
without limit).
"""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet import protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from twistnet._connections import (
    ConnectionCloser,
    ManagedFactory,
    ManagedProtocol,
    send_at_once,
)
from twistnet._internals import write_now
from twistnet._processes import refuse_processes
from twistnet._tap import (
    ServiceOptions,
    ServiceRoot,
    connection_options,
    for_twistd,
    listening_services,
    udp_options,
    udp_service,
)
from twistnet.metrics import ServiceMetrics, add_metrics_service, metrics_option

#: Not 7: binding below 1024 needs root, and a diagnostic should start as any user.
DEFAULT_PORT = 7007

#: Source ports of the simple services (echo, discard, systat, daytime, qotd, chargen, time)
#: and port 0. A UDP echo answering them could be made to bounce forever with another such
#: service by one spoofed datagram; inetd refuses them for the same reason.
LOOP_GUARD_PORTS = frozenset({0, 7, 9, 11, 13, 17, 19, 37})


@implementer(IHalfCloseableProtocol)
class Echo(ManagedProtocol):
    """
    Sends back every byte received.

    Half-closeable: a client that shuts down its sending side (C{nc -N}, C{shutdown(SHUT_WR)})
    still receives every byte it sent before the connection closes, instead of losing what
    was still queued.
    """

    def connectionAdmitted(self) -> None:
        self.transport.registerProducer(self.transport, True)
        send_at_once(self.transport)

    # An echo stream carries only the client's bytes: no notice of ours may enter it, so a
    # refused, idle or evicted connection is closed without a word (and logged).
    idle_message = b""
    evicted_message = b""

    def dataReceived(self, data: bytes) -> None:
        self.spoke()
        counts = self.factory.counts
        counts.bytes_in += len(data)
        counts.bytes_out += len(data)
        write_now(self.transport, data)

    def readConnectionLost(self) -> None:
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()


class EchoFactory(ManagedFactory):
    protocol = Echo
    full_message = b""


class EchoDatagram(protocol.DatagramProtocol):
    """Sends every datagram back to its sender, except to ports that could loop."""

    log = Logger()
    noisy = False

    def __init__(self) -> None:
        self.guarded = LOOP_GUARD_PORTS
        self.dropped = 0

    def startProtocol(self) -> None:
        # Our own port too: two echo servers on the same port must not answer each other.
        own = self.transport.getHost()
        self.guarded = LOOP_GUARD_PORTS | {own.port}
        self.log.info(
            "twistnet-echo listening on {host}:{port} (udp)", host=own.host, port=own.port
        )

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[1] in self.guarded:
            self.dropped += 1
            self.log.debug("dropped datagram from {addr}: loop guard", addr=addr)
            return
        self.transport.write(data, addr)


class Options(ServiceOptions):
    """twistd -n twistnet-echo [--port 7007] [--udp-port 7007]"""

    synopsis = "[options]"
    longdesc = (
        "RFC 862 echo over TCP (and UDP with --udp-port): every byte sent comes back. "
        f"Listens on TCP port {DEFAULT_PORT} on all interfaces unless --port or --listen says "
        "otherwise."
    )
    default_port = DEFAULT_PORT
    service_name = "twistnet-echo"
    optParameters = [
        *connection_options(),
        *udp_options("Also echo UDP datagrams on this port"),
        *metrics_option(),
    ]

    def postOptions(self) -> None:
        refuse_processes(
            self,
            "UDP echo is not shared between processes; drop --udp-port or run one process."
            if self["udp-port"] is not None
            else None,
        )


@for_twistd
def makeService(options: usage.Options, reactor=None) -> MultiService:
    factory = EchoFactory(
        max_connections=options["max-connections"],
        idle_timeout=options["idle-timeout"],
        clock=reactor,
    )
    top = ServiceRoot("twistnet-echo", reactor)
    ConnectionCloser(factory.registry).setServiceParent(top)
    listening_services("twistnet-echo", options.endpoint_descriptions(), factory, reactor, top)
    if options["udp-port"] is not None:
        udp = udp_service(
            options["udp-port"], EchoDatagram(), options["udp-interface"] or "", reactor
        )
        udp.setServiceParent(top)
    add_metrics_service(
        top, "twistnet-echo", options["metrics"], [ServiceMetrics(factory)], reactor
    )
    return top
