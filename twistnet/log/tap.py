"""
The twistd face of twistnet-log: options and the service tree.

The log file is opened while the service is built, so a path that cannot be opened ends
twistd with one line and a non-zero status before anything listens; a file created then is
removed again if no port can be bound.
"""

from __future__ import annotations

import os
import signal

from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from twistnet._connections import ConnectionRegistry
from twistnet._processes import refuse_processes
from twistnet._tap import (
    ServiceOptions,
    ServiceRoot,
    byte_size,
    connection_options,
    for_twistd,
    listening_services,
    non_negative_float,
    non_negative_int,
    one_of,
    udp_options,
    udp_service,
)
from twistnet.log.formats import FORMATS
from twistnet.log.framing import FRAMINGS
from twistnet.log.metrics import LogMetrics
from twistnet.log.protocol import DEFAULT_MAX_LINE, LineLogFactory
from twistnet.log.sink import LogSink
from twistnet.log.udp import DatagramLogProtocol
from twistnet.metrics import ServiceMetrics, add_metrics_service, metrics_option

log = Logger()

SERVICE_NAME = "twistnet-log"

#: 514 is syslog's port and needs root; 5140 is the customary unprivileged stand-in.
DEFAULT_PORT = 5140

#: Relative to the directory twistd runs in, as in the issue's example command.
DEFAULT_FILE = "lines.log"

#: Old files kept by --rotate-bytes unless --keep says otherwise: some history to look back
#: on, while rotation still bounds the disk used to (keep + 1) x --rotate-bytes.
DEFAULT_KEEP = 5


log_format = one_of(FORMATS)
framing = one_of(FRAMINGS)


class Options(ServiceOptions):
    """twistd -n twistnet-log [--port 5140] [--file lines.log] [--format raw|json]"""

    synopsis = "[options]"
    longdesc = (
        "Appends every line clients send (LF or CR LF terminated; a final line without newline "
        "too) to a log file, handed to the OS as soon as it arrives. Listens on TCP port "
        f"{DEFAULT_PORT} on all interfaces unless --port or --listen says otherwise. "
        "Syslog's RFC 6587 octet-counted frames are recognised (--framing); --udp-port also "
        "takes one line per datagram. "
        "SIGHUP or SIGUSR1 reopens the file (for logrotate); SIGTERM flushes and exits."
    )
    default_port = DEFAULT_PORT
    service_name = "twistnet-log"
    optParameters = [
        *connection_options(),
        ["file", "f", DEFAULT_FILE, "The file lines are appended to (created if missing)."],
        [
            "format",
            None,
            "raw",
            "raw: each line as sent; json: one object per line with time, peer and text.",
            log_format,
        ],
        [
            "rotate-bytes",
            None,
            0,
            "Rotate the file before it would grow past this size (0 = never).",
            byte_size,
        ],
        [
            "keep",
            None,
            DEFAULT_KEEP,
            "Rotated files to keep; older ones are deleted.",
            non_negative_int,
        ],
        [
            "fsync",
            None,
            0.0,
            "fsync the file every SECONDS, against machine crashes (0 = never, the OS decides).",
            non_negative_float,
        ],
        [
            "max-line",
            None,
            DEFAULT_MAX_LINE,
            "Longer lines (and syslog frames) are written truncated, with a marker.",
            byte_size,
        ],
        *udp_options("Also log UDP datagrams received on this port, one line each"),
        [
            "framing",
            None,
            "auto",
            "lines: LF-terminated; octet-counted: RFC 6587 syslog frames (logger --octet-count); "
            "auto: octet-counted if a connection starts with a length, a space and <PRI>.",
            framing,
        ],
        *metrics_option(),
    ]

    def postOptions(self) -> None:
        refuse_processes(
            self,
            "--rotate-bytes counts the file's size in one process, and N processes appending "
            "to one file would each rotate on their own count; run one process per file.",
        )
        if not self["file"]:
            raise usage.UsageError("--file needs a file name, for example --file lines.log.")
        if self["max-line"] < 1:
            raise usage.UsageError("--max-line must be at least 1 byte.")
        if self["rotate-bytes"] and self["rotate-bytes"] < self["max-line"]:
            raise usage.UsageError(
                f"--rotate-bytes {self['rotate-bytes']} is smaller than --max-line "
                f"{self['max-line']}: a single line could not fit in one file."
            )


class LogService(Service):
    """
    Owns the sink's lifetime: on stop, closes every connection (their last unterminated
    lines are written) and only then flushes, fsyncs and closes the file.
    """

    def __init__(self, sink: LogSink, registry: ConnectionRegistry, signals: bool) -> None:
        self.sink = sink
        self.registry = registry
        self.signals = signals

    def startService(self) -> None:
        super().startService()
        if self.signals:
            from twisted.internet import reactor

            reactor.callWhenRunning(_reopen_on_signals, reactor, self.sink)

    def stopService(self):
        super().stopService()
        closed = self.registry.close_all()
        closed.addBoth(lambda _: self.sink.close())
        return closed


class LogRoot(ServiceRoot):
    """The service root that removes the log file it created when no port could be bound."""

    def __init__(self, sink: LogSink, reactor=None) -> None:
        super().__init__(SERVICE_NAME, reactor)
        self.sink = sink

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except BaseException:
            self.sink.abandon()
            raise


def _reopen_on_signals(reactor, sink: LogSink) -> None:
    """SIGHUP and SIGUSR1 reopen the file; a handler twistd installed first still runs."""
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        previous = signal.getsignal(signum)

        def handler(number, frame, previous=previous) -> None:
            # A signal may land in the middle of a write: do the work in the reactor's turn.
            reactor.callFromThread(sink.reopen)
            if callable(previous):
                previous(number, frame)

        signal.signal(signum, handler)
    log.info("{service} reopens {path} on SIGHUP or SIGUSR1", service=SERVICE_NAME, path=sink.path)


@for_twistd
def makeService(options: usage.Options, reactor=None) -> MultiService:
    sink = LogSink(
        options["file"],
        format=options["format"],
        rotate_bytes=options["rotate-bytes"],
        keep=options["keep"],
        fsync_interval=options["fsync"],
        clock=reactor,
    )
    if options["rotate-bytes"] and not os.access(os.path.dirname(sink.path), os.W_OK):
        raise SystemExit(
            f"{SERVICE_NAME}: cannot rotate {sink.path}: "
            f"its directory {os.path.dirname(sink.path)} is not writable"
        )
    try:
        sink.open()
    except OSError as error:
        raise SystemExit(
            f"{SERVICE_NAME}: cannot open log file {sink.path}: {error.strerror}"
        ) from None
    factory = LineLogFactory(
        sink,
        max_line=options["max-line"],
        max_connections=options["max-connections"],
        idle_timeout=options["idle-timeout"],
        framing=options["framing"],
    )
    top = LogRoot(sink, reactor)
    # Added first, so it stops last: after the listeners stop accepting.
    LogService(sink, factory.registry, signals=reactor is None).setServiceParent(top)
    listening_services(SERVICE_NAME, options.endpoint_descriptions(), factory, reactor, top)
    datagrams = None
    if options["udp-port"] is not None:
        datagrams = DatagramLogProtocol(sink, options["max-line"])
        udp_service(
            options["udp-port"], datagrams, options["udp-interface"] or "", reactor
        ).setServiceParent(top)
    collectors = [ServiceMetrics(factory), LogMetrics(factory, datagrams)]
    add_metrics_service(top, SERVICE_NAME, options["metrics"], collectors, reactor)
    log.info(
        "{service} appending {kind} lines to {path}",
        service=SERVICE_NAME,
        kind=options["format"],
        path=sink.path,
    )
    return top
