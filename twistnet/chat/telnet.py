"""
Telnet bytes without IO: L{TelnetFilter} strips commands from what a client sends and says
how to answer its option requests, the way C{twisted.conch.telnet} layers application data
above the command parser.

The server refuses every option: each C{DO x} is answered C{WONT x} and each C{WILL x} is
answered C{DONT x}, every time (telnet's Ctrl-C sends C{IAC IP IAC DO TIMING-MARK} and
discards all output until the answer arrives). It never asks for an option itself and never
answers C{WONT}/C{DONT}, so no negotiation can loop (RFC 854, RFC 1143). Other two-byte
commands (C{IAC IP}, C{AYT}, ...) and whole subnegotiations are dropped; C{IAC IAC} is the
data byte 0xFF. Nothing malformed raises: an unknown command byte is dropped with its IAC.
"""

from __future__ import annotations

#: Telnet command bytes (RFC 854).
IAC, SB, SE, WILL, WONT, DO, DONT = 255, 250, 240, 251, 252, 253, 254
_IAC = b"\xff"
_IAC_SE = b"\xff\xf0"
_REFUSAL = {DO: WONT, WILL: DONT}


class TelnetFilter:
    """One connection's telnet state: a command split across reads is kept for the next."""

    def __init__(self) -> None:
        self._tail = b""
        self._in_subnegotiation = False

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """C{data} as (application bytes, the answers to send back)."""
        if not (self._tail or self._in_subnegotiation or _IAC in data):
            return data, b""
        data = self._tail + data
        self._tail = b""
        out: list[bytes] = []
        answers: list[bytes] = []
        start = 0
        end = len(data)
        if self._in_subnegotiation:
            found = data.find(_IAC_SE)
            if found < 0:
                # Swallowed whole; keep a final IAC in case its SE comes next.
                if data.endswith(_IAC):
                    self._tail = _IAC
                return b"", b""
            self._in_subnegotiation = False
            start = found + 2
        while start < end:
            at = data.find(_IAC, start)
            if at < 0:
                out.append(data[start:])
                break
            out.append(data[start:at])
            if at + 1 >= end:
                self._tail = data[at:]
                break
            command = data[at + 1]
            if command == IAC:
                out.append(_IAC)
                start = at + 2
            elif command in (WILL, WONT, DO, DONT):
                if at + 2 >= end:
                    self._tail = data[at:]
                    break
                refusal = _REFUSAL.get(command)
                if refusal is not None:
                    answers.append(bytes((IAC, refusal, data[at + 2])))
                start = at + 3
            elif command == SB:
                found = data.find(_IAC_SE, at + 2)
                if found < 0:
                    self._in_subnegotiation = True
                    if data.endswith(_IAC):
                        self._tail = _IAC
                    break
                start = found + 2
            else:
                start = at + 2
        return b"".join(out), b"".join(answers)
