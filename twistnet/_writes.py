"""
Write-through for TCP transports: send at once when nothing is queued.

Twisted's L{FileDescriptor.write} appends to a buffer and waits for the next reactor turn to
call C{send()} (Twisted ticket 5303, open since 2011). For request/response traffic that costs
an extra trip through the reactor per reply. When the transport has nothing queued, sending
right away cannot reorder bytes, so L{write_now} does exactly that and hands any remainder to
the ordinary buffered C{write}, which keeps producers, backpressure and error handling intact.

The fast path is feature-detected: any transport that does not look like a plain
C{twisted.internet.tcp.Connection} (TLS, UNIX sockets on other reactors, test transports)
gets a plain C{write}.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.interfaces import ITransport

_PRIVATE_STATE = ("dataBuffer", "_tempDataLen", "_writeDisconnected", "writeSomeData")


def _supports_write_through(transport: object) -> bool:
    return isinstance(transport, tcp.Connection) and all(
        hasattr(transport, name) for name in _PRIVATE_STATE
    )


_SUPPORTED: dict[type, bool] = {}


def write_now(transport: ITransport, data: bytes) -> None:
    """Write C{data}, sending it immediately when the transport's buffer is empty."""
    kind = type(transport)
    supported = _SUPPORTED.get(kind)
    if supported is None:
        supported = _SUPPORTED[kind] = _supports_write_through(transport)
    if (
        supported
        and data
        and not transport._tempDataLen  # type: ignore[attr-defined]
        and not transport.dataBuffer  # type: ignore[attr-defined]
        and transport.connected  # type: ignore[attr-defined]
        and not transport.disconnecting  # type: ignore[attr-defined]
        and not transport._writeDisconnected  # type: ignore[attr-defined]
    ):
        sent = transport.writeSomeData(data)  # type: ignore[attr-defined]
        if isinstance(sent, int) and sent >= 0:
            if sent < len(data):
                transport.write(data[sent:])
            return
        # The socket failed; the buffered path rediscovers the error and closes properly.
    transport.write(data)
