"""Shared by the chat tests: in-memory chat connections and raw-socket chat clients."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from twisted.internet import task
from twisted.internet.testing import StringTransport

from helpers import connect, recv_until
from http_support import result_of as now  # noqa: F401  (re-exported for the chat tests)
from twistnet.chat.protocol import ChatFactory, ChatLimits, ChatProtocol
from twistnet.chat.room import Room

#: Limits off, so a unit test only meets the limit it is about.
NO_LIMITS = ChatLimits(max_line=4096, rate=0, burst=20, sendq=0)


def make_chat(limits=NO_LIMITS, max_clients=0, idle_timeout=0.0, history=20, room=None):
    clock = task.Clock()
    room = room if room is not None else Room(history_size=history)
    factory = ChatFactory(room, limits, max_clients, idle_timeout, clock)
    return factory, clock


def join(factory, transport=None) -> tuple[ChatProtocol, StringTransport]:
    proto = factory.buildProtocol(None)
    transport = transport if transport is not None else StringTransport()
    proto.makeConnection(transport)
    transport.chat_clock = factory.registry.clock
    return proto, transport


def sent(transport: StringTransport) -> bytes:
    """Everything written to C{transport}, once this reactor turn's output is flushed."""
    transport.chat_clock.advance(0)
    return transport.value()


def take(transport: StringTransport) -> list[str]:
    """The lines written to C{transport} since the last call, as text; clears it."""
    data = sent(transport)
    transport.clear()
    return data.decode("utf-8").split("\r\n")[:-1]


def hang_up(proto, transport) -> None:
    transport.loseConnection()
    proto.connectionLost(None)


class ChatClient:
    """A raw-socket chat client for end-to-end tests, telnet-like or nc-like."""

    def __init__(self, port: int, eol: bytes = b"\n", host: str = "127.0.0.1") -> None:
        self.sock: socket.socket = connect(port, host)
        # As telnet does: otherwise Nagle holds a line until the server's delayed ACK,
        # and latency figures would measure the client's 40 ms wait, not the server.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.eol = eol
        self.received = b""
        self.name = self.wait_for(b"Welcome to twistnet chat, ").split(b", ", 1)[1]
        self.name = self.name.split(b"!", 1)[0].decode()

    def send(self, *lines: str | bytes) -> None:
        data = b"".join(
            (line.encode() if isinstance(line, str) else line) + self.eol for line in lines
        )
        self.sock.sendall(data)

    def wait_for(self, needle: bytes, timeout: float = 20.0) -> bytes:
        """Read until C{needle} arrived; returns the line holding it and consumes up to it."""
        data = recv_until(self.sock, lambda got: needle in self.received + got, timeout)
        self.received += data
        at = self.received.index(needle)
        start = self.received.rfind(b"\n", 0, at) + 1
        end = self.received.find(b"\r\n", at)
        end = len(self.received) if end < 0 else end
        line = self.received[start:end]
        self.received = self.received[end:]
        return line

    def rename(self, name: str) -> None:
        self.send(f"/NAME {name}")
        self.wait_for(f"is now known as {name}".encode())
        self.name = name

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def peak_rss_kib(server) -> int:
    """The highest resident memory the server process reached so far (VmHWM), in KiB."""
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
