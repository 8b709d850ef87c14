"""Admission shared by every service: the factory decides, silent connections make room,
refusals are summarized in the log."""

from __future__ import annotations

from twisted.internet import protocol, task
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from twistnet._connections import (
    EVICTION_GRACE_SECONDS,
    ManagedFactory,
    ManagedProtocol,
    Refused,
    hang_up,
)


class Quiet(ManagedProtocol):
    def dataReceived(self, data: bytes) -> None:
        self.spoke()


class QuietFactory(ManagedFactory):
    protocol = Quiet


def connect(factory, host="127.0.0.1", port=40000):
    from twisted.internet.address import IPv4Address

    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    proto.makeConnection(transport)
    return proto, transport


def test_factory_refuses_with_its_own_small_protocol_when_everyone_works():
    clock = task.Clock()
    factory = QuietFactory(max_connections=1, clock=clock)
    first, _ = connect(factory)
    first.dataReceived(b"x")
    clock.advance(EVICTION_GRACE_SECONDS * 10)
    refused, transport = connect(factory)
    assert isinstance(refused, Refused)
    assert transport.value() == ManagedFactory.full_message
    assert transport.disconnecting
    assert len(factory.registry) == 1
    # A peer that never reads is aborted after the grace, and nothing is left scheduled.
    refused.connectionLost(None)
    factory.stopFactory()
    assert clock.getDelayedCalls() == []


def test_a_flood_is_logged_once_then_summarized_once_a_second():
    clock = task.Clock()
    factory = QuietFactory(max_connections=1, clock=clock)
    first, _ = connect(factory)
    first.dataReceived(b"x")
    with capturedLogs() as events:
        refused = [connect(factory, port=50000 + n)[0] for n in range(250)]
        assert len(events) == 1
        assert "refused at --max-connections 1" in events[0]["log_format"].format(**events[0])
        clock.advance(1)
        assert len(events) == 2
        summary = events[1]["log_format"].format(**events[1])
        assert "249 more connections turned away in 1 s: 249 refused at --max-connections 1" in (
            summary
        )
        clock.advance(1)  # a quiet second: nothing more, and the next one is logged at once
        connect(factory, port=60000)
        clock.advance(1)
    assert len(events) == 3
    assert factory.refusals.totals == {"refused at --max-connections 1": 251}
    for proto in refused:
        proto.connectionLost(None)


def test_http_style_waiting_again_puts_a_connection_last_in_line():
    clock = task.Clock()
    factory = QuietFactory(max_connections=2, clock=clock)
    a, a_t = connect(factory)
    _b, b_t = connect(factory)
    factory.registry.working(a)
    clock.advance(5)
    factory.registry.waiting(a)  # a finished a request: idle from now on
    clock.advance(EVICTION_GRACE_SECONDS + 0.1)
    connect(factory)
    assert b_t.disconnecting and not a_t.disconnecting


def test_hang_up_aborts_a_peer_that_does_not_read():
    clock = task.Clock()

    class Transport(StringTransport):
        aborted = False

        def abortConnection(self):
            self.aborted = True

    transport = Transport()
    call = hang_up(transport, clock, grace=5)
    assert transport.disconnecting
    clock.advance(4.9)
    assert not transport.aborted
    clock.advance(0.2)
    assert transport.aborted
    assert not call.active()


def test_close_all_waits_for_evicted_connections_too():
    clock = task.Clock()
    factory = QuietFactory(max_connections=1, clock=clock)
    old, _ = connect(factory)
    clock.advance(EVICTION_GRACE_SECONDS + 1)
    new, _ = connect(factory)
    gone = factory.registry.close_all()
    new.connectionLost(None)
    assert not gone.called
    old.connectionLost(None)
    assert gone.called
    assert isinstance(new, protocol.Protocol)
