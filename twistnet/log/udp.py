"""
UDP input of twistnet-log (C{--udp-port}): one record per datagram, as C{logger --udp} and
syslog relays send them.

UDP has no backpressure: while the disk refuses writes the sender cannot be paused, so the
datagrams that arrive meanwhile are dropped and counted, and the count is logged.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from twistnet.log.framing import strip_line_end
from twistnet.log.sink import LogSink

#: Drops are summarised in one log line at most this often: loud, but not a flood.
DROP_REPORT_SECONDS = 1.0


class DropCounter:
    """Counts dropped datagrams and says when a summary is due. IO-free: callers pass the time."""

    def __init__(self, every: float = DROP_REPORT_SECONDS) -> None:
        self.every = every
        self.total = 0
        #: Dropped since the last summary.
        self.unreported = 0
        self.unreported_bytes = 0
        self._last_report: float | None = None

    def dropped(self, size: int, now: float) -> float:
        """Count one dropped datagram of C{size} bytes; in how many seconds a summary is due."""
        self.total += 1
        self.unreported += 1
        self.unreported_bytes += size
        if self._last_report is None:
            return 0.0
        return max(0.0, self._last_report + self.every - now)

    def report(self, now: float) -> tuple[int, int]:
        """The (datagrams, bytes) dropped since the last summary; starts a new period."""
        counts = (self.unreported, self.unreported_bytes)
        self.unreported = self.unreported_bytes = 0
        self._last_report = now
        return counts


class DatagramLogProtocol(protocol.DatagramProtocol):
    """Writes every datagram as one record: one trailing LF or CR LF removed, inner LFs escaped."""

    log = Logger()
    noisy = False

    def __init__(self, sink: LogSink, max_line: int) -> None:
        self.sink = sink
        self.max_line = max_line
        self.drops = DropCounter()
        self.truncated = 0
        self._report_call: IDelayedCall | None = None

    def startProtocol(self) -> None:
        own = self.transport.getHost()
        self.log.info("twistnet-log listening on {host}:{port} (udp)", host=own.host, port=own.port)

    def stopProtocol(self) -> None:
        self._report_drops()

    def datagramReceived(self, data: bytes, addr: tuple) -> None:
        if self.sink.blocked:
            due = self.drops.dropped(len(data), self.sink.clock.seconds())
            if not due:
                self._report_drops()
            elif self._report_call is None:
                self._report_call = self.sink.clock.callLater(due, self._report_drops)
            return
        peer = f"{addr[0]}:{addr[1]}"
        text = strip_line_end(data)
        if len(text) > self.max_line:
            self.truncated += 1
            self.log.warn(
                "truncated a {length}-byte datagram from {peer} to --max-line {max_line} bytes "
                "({count} truncated so far)",
                length=len(text),
                peer=peer,
                max_line=self.max_line,
                count=self.truncated,
            )
            record = self.sink.format.message(text[: self.max_line], peer, length=len(text))
        else:
            record = self.sink.format.message(text, peer)
        self.sink.write(record)

    def _report_drops(self) -> None:
        if self._report_call is not None and self._report_call.active():
            self._report_call.cancel()
        self._report_call = None
        if not self.drops.unreported:
            return
        count, size = self.drops.report(self.sink.clock.seconds())
        self.log.critical(
            "dropped {count} UDP datagrams ({size} bytes) while {path} was not writable "
            "({total} dropped in all)",
            count=count,
            size=size,
            path=self.sink.path,
            total=self.drops.total,
        )
