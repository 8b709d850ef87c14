"""
The workloads of issue 6: each service against its peers, driven in interleaved rounds.

A workload starts every contender once (twistnet through twistd, peers as child processes),
then runs each of its measurements round by round across the contenders (A B C A B C ...),
and finally measures memory per idle connection on freshly started servers.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.client import HTTPConnection, HTTPException
from pathlib import Path

from benchmarks.build import binary
from benchmarks.processes import (
    Missing,
    Server,
    baseline_env,
    free_port,
    python_peer,
    require_module,
    require_tool,
    twistd_executable,
)
from benchmarks.profiling import profile
from benchmarks.report import BASELINE_SUFFIX, STOCK_REACTOR_SUFFIX, Figure, Section, Target

LOOPBACK_TCP = "tcp:0:interface=127.0.0.1"
#: twistd's options for Twisted's stock epoll reactor, not twistnet's (the services' default).
STOCK_REACTOR = ("--reactor", "epoll")
ROOT = Path(__file__).resolve().parent.parent

#: Bounds for one load generator run beyond its own planned length (slow servers, busy machine).
SLACK_SECONDS = 120.0

#: How often the server's RSS is sampled while a load generator runs.
SAMPLE_SECONDS = 0.05


class Failed(Exception):
    """One measurement failed; noted in the table, the other rounds go on."""


@dataclass(frozen=True)
class Settings:
    rounds: int = 3
    duration: float = 5.0  # seconds per timed echo / HTTP measurement
    warmup: float = 1.0
    idle: int = 5000
    echo_small: tuple[int, int] = (50, 1024)  # connections, message bytes
    echo_large: tuple[int, int] = (10, 65536)
    chat: tuple[int, int, int] = (200, 10, 1000)  # clients, senders, lines per sender
    chat_growth: tuple[int, ...] = (10, 100, 1000)
    chat_growth_deliveries: int = 2_000_000  # lines per sender scaled to about this many
    chat_line: int = 64
    chat_window: int = 50
    log: tuple[int, int, int] = (10, 100_000, 100)  # connections, lines each, line bytes
    http_connections: int = 50
    #: A checkout of an older twistnet, run as one more contender per workload (--baseline).
    baseline: Path | None = None
    #: Take a py-spy profile of each twistnet server in one extra, unreported run.
    profile: bool = False
    workdir: Path = Path("benchmarks/.build/run")

    @classmethod
    def smoke(cls, **changes) -> Settings:
        """A few seconds in all: keeps the harness working in CI, measures nothing useful."""
        tiny = cls(
            rounds=1,
            duration=0.5,
            warmup=0.1,
            idle=50,
            echo_small=(5, 1024),
            echo_large=(2, 65536),
            chat=(20, 3, 50),
            chat_growth=(10,),
            chat_growth_deliveries=2_000,
            log=(2, 1000, 100),
            http_connections=4,
        )
        return replace(tiny, **changes)


@dataclass
class Contender:
    name: str
    make: Callable[[Path], Server]  # may raise Missing
    idle: bool = True  # measured for memory per idle connection
    idle_note: str = ""
    #: Bytes of the last writes a server may hold in its own buffer (the classic logger).
    held_bytes: int = 0
    #: Keeps each line whole in the file (socat, with no framing, interleaves connections).
    framed: bool = True
    #: A twistnet service (this checkout's or the baseline's), not a peer.
    twistnet: bool = False


@dataclass
class Workload:
    name: str
    contenders: list[Contender]
    run: Callable[[Workload, Settings, dict[str, Server]], list[Section]]
    idle_title: str = ""
    #: The servers speak first (a chat welcome): idle clients connect at the pace they greet.
    greets: bool = False
    sections: list[Section] = field(default_factory=list)


# --- helpers ---------------------------------------------------------------------------------


class TwistdServer(Server):
    """
    A twistnet service under twistd (C{twistd_options}, such as C{--reactor}, go before the
    service); one that has not landed yet is reported as such.
    """

    def __init__(
        self,
        service: str,
        args: tuple[str, ...],
        workdir: Path,
        baseline: Path | None = None,
        twistd_options: tuple[str, ...] = (),
    ) -> None:
        self.twistd = twistd_executable(service)
        self.service = service
        argv = [self.twistd, *twistd_options, "-n", "--pidfile=", service]
        argv += ["--listen", LOOPBACK_TCP, *args]
        super().__init__(service, argv, workdir, env=baseline_env(baseline))

    def start(self) -> int:
        if not Path(self.twistd).exists() and shutil.which(self.twistd) is None:
            raise Missing(f"no twistd at {self.twistd} (set TWISTNET_TWISTD)")
        try:
            return super().start()
        except Missing:
            placeholder = subprocess.run(
                [self.twistd, self.service, "--help"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env={**os.environ, **(self.env or {})},
            )
            found = re.search(r"[Nn]ot available yet[^.]*", placeholder.stdout)
            if found:
                raise Missing(f"{self.service}: {found.group(0)}") from None
            raise


def twistnet(
    service: str,
    *args: str,
    baseline: Path | None = None,
    twistd_options: tuple[str, ...] = (),
) -> Callable[[Path], Server]:
    def make(workdir: Path) -> Server:
        return TwistdServer(service, args, workdir, baseline, twistd_options)

    return make


def twistnet_contenders(
    settings: Settings,
    service: str,
    make_for: Callable[[Path | None, tuple[str, ...]], Callable[[Path], Server]],
) -> list[Contender]:
    """
    C{service} from this checkout (on the twistnet reactor, its default), with --baseline the
    older checkout's right after it, so that each round measures the two back to back, then
    this checkout's on Twisted's stock reactor (C{--reactor epoll}). C{make_for(None, ())}
    makes this checkout's server, C{make_for(path, ())} the baseline's (whose options may
    differ), C{make_for(None, STOCK_REACTOR)} this checkout's on the stock reactor.
    """
    contenders = [Contender(service, make_for(None, ()), twistnet=True)]
    if settings.baseline is not None:
        name = service + BASELINE_SUFFIX
        contenders.append(Contender(name, make_for(settings.baseline, ()), twistnet=True))
    name = service + STOCK_REACTOR_SUFFIX
    contenders.append(
        Contender(
            name,
            make_for(None, STOCK_REACTOR),
            twistnet=True,
            idle=False,
            idle_note="the same server: the reactor's dispatch holds no memory per connection",
        )
    )
    return contenders


def peer(name: str, script: str, *args: str, module: str | None = None):
    def make(workdir: Path) -> Server:
        if module:
            require_module(module)
        return Server(name, python_peer(script, "0", *args), workdir)

    return make


def run_loadgen(argv: list[str], server: Server, planned: float) -> tuple[dict, int]:
    """Run a load generator to its end; its JSON summary and the server's peak RSS (KiB)."""
    proc = subprocess.Popen(
        [str(a) for a in argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + planned + SLACK_SECONDS
    peak = 0
    while proc.poll() is None:
        if server.alive():
            peak = max(peak, server.rss_kib())
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            raise Failed(f"load generator still running after {planned + SLACK_SECONDS:.0f}s")
        time.sleep(SAMPLE_SECONDS)
    out, err = proc.communicate()
    try:
        summary = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise Failed(f"load generator failed ({proc.returncode}): {err.strip()[-300:]}") from None
    if not server.alive():
        raise Failed(f"server exited during the run: {server.problem()}")
    if proc.returncode != 0:
        summary["failure"] = f"exit {proc.returncode}: {err.strip()[-200:]} {out.strip()[-200:]}"
    return summary, peak


def start_all(workload: Workload, settings: Settings) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    for contender in workload.contenders:
        try:
            server = contender.make(settings.workdir / workload.name / slug(contender.name))
            server.start()
        except Missing as error:
            for section in workload.sections:
                section.row(contender.name).missing = str(error)
            print(f"   {contender.name}: missing ({error})", flush=True)
            continue
        servers[contender.name] = server
    return servers


def slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-")


def interleave(
    section: Section,
    servers: dict[str, Server],
    settings: Settings,
    measure: Callable[[str, Server], dict[str, float]],
) -> None:
    """Measure every contender once per round, in the same order each round."""
    for number in range(1, settings.rounds + 1):
        for name, server in servers.items():
            row = section.row(name)
            if row.missing:
                continue
            if not server.alive():
                row.missing = f"server exited: {server.problem()}"
                continue
            try:
                measured = measure(name, server)
            except (Failed, Missing, OSError, subprocess.SubprocessError, ValueError) as error:
                row.notes.append(f"round {number}: {error}")
                print(f"   {section.key} {name} round {number}: {error}", flush=True)
                continue
            row.add(measured, number)
            shown = ", ".join(
                f"{f.label} {measured[f.key]:.{f.digits}f}"
                for f in section.figures
                if f.key in measured
            )
            print(f"   {section.key} round {number} {name}: {shown}", flush=True)
    if settings.profile:
        profile_subject(section, servers, measure, settings.workdir.parent / "profiles")


#: A profile covers at least this long a stretch of load, in at most so many repeated runs.
PROFILE_SECONDS = 3.0
PROFILE_REPEATS = 20


def profile_subject(section: Section, servers: dict[str, Server], measure, where: Path) -> None:
    """One extra run of the twistnet server under py-spy; its summary becomes a note."""
    subject = section.subject
    if subject is None or subject.missing or subject.contender not in servers:
        return
    server = servers[subject.contender]
    out = where / f"{section.key}.txt"

    def repeat() -> None:
        # Short runs (a chat round can take a quarter of a second) repeat for enough samples.
        until = time.monotonic() + PROFILE_SECONDS
        for _ in range(PROFILE_REPEATS):
            measure(subject.contender, server)
            if time.monotonic() > until:
                break

    try:
        result = profile(server, repeat, out)
    except (Failed, Missing, OSError, subprocess.SubprocessError, ValueError) as error:
        section.profile = f"profile run failed: {error}"
        return
    if result is None:
        section.profile = "py-spy not installed (uv run --group bench)"
        return
    summary, raw = result
    where_shown = raw.parent.relative_to(ROOT) if raw.is_relative_to(ROOT) else raw.parent
    section.profile = f"py-spy, {raw.name} in {where_shown}:\n{summary}"
    print(f"   {section.key} profile of {subject.contender}:\n{summary}", flush=True)


def new_sections(workload: Workload, sections: list[Section]) -> list[Section]:
    """Register C{sections}, each with a row per contender in order (twistnet first)."""
    for section in sections:
        for contender in workload.contenders:
            section.row(contender.name)
    workload.sections += sections
    return sections


def mib(kib: float) -> float:
    return kib / 1024.0


# --- memory per idle connection ----------------------------------------------------------------

IDLE_FIGURES = [
    Figure("kib_per_conn", "KiB per idle connection", higher_is_better=False, digits=1),
    Figure("held", "connections held"),
    Figure("rss_mib", "server RSS with them, MiB", digits=1),
]


def quiescent(server: Server, still: float = 0.5, limit: float = 120.0) -> None:
    """Wait until the server stops using CPU (joins announced, buffers drained)."""
    deadline = time.monotonic() + limit
    last = server.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(still)
        now = server.cpu_seconds()
        if now - last < 0.02:
            return
        last = now


def idle_memory(server: Server, count: int, greeted: bool) -> dict[str, float]:
    quiescent(server)
    base_rss, base_fds = server.rss_kib(), server.open_fds()
    # A chat's join storm is quadratic (5,000 joins announced to up to 5,000 clients each).
    connect_seconds = SLACK_SECONDS * 5
    hold_ms = int((connect_seconds + SLACK_SECONDS * 3) * 1000)
    holder = subprocess.Popen(
        [str(binary("idle_holder")), str(server.port), str(count), str(hold_ms), str(int(greeted))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([holder.stdout], [], [], connect_seconds)
        line = holder.stdout.readline() if ready else ""
        if not line.startswith("connected"):
            holder.kill()
            problem = holder.communicate()[1].strip()[-300:] or f"not within {connect_seconds:.0f}s"
            raise Failed(f"idle holder did not connect: {problem}")
        deadline = time.monotonic() + SLACK_SECONDS
        while server.open_fds() < base_fds + count and time.monotonic() < deadline:
            time.sleep(0.05)
        quiescent(server)
        held = server.open_fds() - base_fds
        rss = server.rss_kib()
    finally:
        if holder.poll() is None:
            holder.stdin.close()
            try:
                holder.wait(30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
    if held < count * 0.9:
        raise Failed(f"server accepted only {held} of {count} idle connections")
    return {"kib_per_conn": (rss - base_rss) / held, "held": held, "rss_mib": mib(rss)}


def measure_idle(workload: Workload, settings: Settings, title: str) -> Section:
    """Memory per idle connection, each contender freshly started (no allocator history)."""
    section = new_sections(workload, [Section(f"{workload.name}-idle", title, IDLE_FIGURES)])[0]
    for contender in workload.contenders:
        row = section.row(contender.name)
        if row.missing:
            continue
        if not contender.idle:
            row.missing = contender.idle_note or "not measured"
            continue
        try:
            server = contender.make(
                settings.workdir / workload.name / f"{slug(contender.name)}-idle"
            )
            server.start()
        except Missing as error:
            row.missing = str(error)
            continue
        try:
            measured = idle_memory(server, settings.idle, workload.greets)
            row.add(measured)
            print(
                f"   {section.key} {contender.name}: {measured['kib_per_conn']:.1f} KiB/conn",
                flush=True,
            )
        except Failed as error:
            row.notes.append(str(error))
            print(f"   {section.key} {contender.name}: {error}", flush=True)
        finally:
            server.stop()
    return section


# --- echo ---------------------------------------------------------------------------------------

ECHO_FIGURES = [
    Figure("msgs_per_s", "messages/s"),
    Figure("mib_per_s", "MiB/s", digits=1),
    Figure("p50_us", "p50 µs"),
    Figure("p99_us", "p99 µs"),
    Figure("rss_mib", "server peak RSS, MiB", digits=1),
]


def echo_epoll(workdir: Path) -> Server:
    return Server("C epoll", [str(binary("echo_epoll")), "0"], workdir)


def run_echo(workload: Workload, settings: Settings, servers: dict[str, Server]) -> None:
    for key, (connections, size) in (
        ("echo-1k", settings.echo_small),
        ("echo-64k", settings.echo_large),
    ):
        section = next(s for s in workload.sections if s.key == key)

        def measure(name: str, server: Server, connections=connections, size=size):
            argv = [
                binary("echo_client"),
                server.port,
                connections,
                size,
                int(settings.duration * 1000),
                int(settings.warmup * 1000),
            ]
            summary, peak = run_loadgen(argv, server, settings.duration + settings.warmup)
            if summary.get("failure") or not summary["messages"]:
                raise Failed(summary.get("failure", "no message came back"))
            return {**{f.key: summary[f.key] for f in ECHO_FIGURES[:4]}, "rss_mib": mib(peak)}

        interleave(section, servers, settings, measure)


def echo_workload(settings: Settings) -> Workload:
    workload = Workload(
        "echo",
        [
            *twistnet_contenders(
                settings,
                "twistnet-echo",
                lambda baseline, options: twistnet(
                    "twistnet-echo",
                    *("--max-connections", "0"),
                    baseline=baseline,
                    twistd_options=options,
                ),
            ),
            Contender("wire.Echo", peer("wire.Echo", "echo_wire.py")),
            Contender("asyncio", peer("asyncio", "echo_asyncio.py")),
            Contender("uvloop", peer("uvloop", "echo_uvloop.py", module="uvloop")),
            Contender("C epoll", echo_epoll),
        ],
        run_echo,
    )
    small, large = settings.echo_small, settings.echo_large
    new_sections(
        workload,
        [
            Section(
                "echo-1k",
                f"echo: {small[0]} connections x {small[1]:,} B request/response",
                ECHO_FIGURES,
            ),
            Section(
                "echo-64k",
                f"echo: {large[0]} connections x {large[1]:,} B request/response",
                ECHO_FIGURES,
            ),
        ],
    )
    workload.idle_title = f"echo: memory per idle connection ({settings.idle:,} idle clients)"
    return workload


# --- chat ---------------------------------------------------------------------------------------

CHAT_FIGURES = [
    Figure("deliveries_per_s", "deliveries/s"),
    Figure("rss_mib", "server peak RSS, MiB", digits=1),
    Figure("join_s", "connect and join, s", digits=2),
]

#: twistnet-chat with every limit on, each set where an honest benchmark client never trips it:
#: the senders are a few programs sending as fast as the server takes lines.
CHAT_LIMITS = ("--max-clients", "20000", "--rate", "100000", "--burst", "100000")


def chat_lines(settings: Settings, clients: int, senders: int) -> int:
    wanted = settings.chat_growth_deliveries // max(1, senders * (clients - 1))
    return max(10, min(settings.chat[2], wanted))


def chat_measure(settings: Settings, clients: int, senders: int, lines: int):
    def measure(name: str, server: Server) -> dict[str, float]:
        planned = clients * 0.02 + senders * lines * clients / 50_000
        argv = [
            binary("chat_client"),
            server.port,
            clients,
            senders,
            lines,
            settings.chat_line,
            settings.chat_window,
            300,
            int((planned + SLACK_SECONDS) * 1000),
        ]
        summary, peak = run_loadgen(argv, server, planned + SLACK_SECONDS)
        if summary.get("failure"):
            raise Failed(
                f"{summary['delivered']:,} of {summary['expected']:,} delivered, "
                f"{summary['closed']} clients closed: {summary['failure']}"
            )
        return {
            "deliveries_per_s": summary["deliveries_per_s"],
            "rss_mib": mib(peak),
            "join_s": summary["join_s"],
        }

    return measure


def run_chat(workload: Workload, settings: Settings, servers: dict[str, Server]) -> None:
    clients, senders, lines = settings.chat
    main = next(s for s in workload.sections if s.key == "chat")
    interleave(main, servers, settings, chat_measure(settings, clients, senders, lines))
    for size in settings.chat_growth:
        section = next(s for s in workload.sections if s.key == f"chat-{size}")
        growth_senders = min(senders, size - 1)
        growth_lines = chat_lines(settings, size, growth_senders)
        measure = chat_measure(settings, size, growth_senders, growth_lines)
        interleave(section, servers, settings, measure)


def chat_workload(settings: Settings) -> Workload:
    workload = Workload(
        "chat",
        [
            *twistnet_contenders(
                settings,
                "twistnet-chat",
                lambda baseline, options: twistnet(
                    "twistnet-chat", *CHAT_LIMITS, baseline=baseline, twistd_options=options
                ),
            ),
            Contender("classic Twisted chat", peer("classic Twisted chat", "chat_classic.py")),
            Contender("asyncio chat", peer("asyncio chat", "chat_asyncio.py")),
        ],
        run_chat,
        greets=True,
    )
    clients, senders, lines = settings.chat
    sections = [
        Section(
            "chat",
            f"chat: {clients} clients, {senders} senders x {lines:,} lines of "
            f"{settings.chat_line} B",
            CHAT_FIGURES,
        )
    ]
    for size in settings.chat_growth:
        growth_senders = min(senders, size - 1)
        sections.append(
            Section(
                f"chat-{size}",
                f"chat growth: {size:,} clients, {growth_senders} senders x "
                f"{chat_lines(settings, size, growth_senders):,} lines",
                CHAT_FIGURES,
            )
        )
    new_sections(workload, sections)
    workload.idle_title = f"chat: memory per idle client ({settings.idle:,} idle clients)"
    return workload


# --- log ----------------------------------------------------------------------------------------

LOG_FIGURES = [
    Figure("lines_per_s", "lines/s until visible in the file"),
    Figure("mib_per_s", "MiB/s", digits=1),
    Figure("visible_s", "all visible after, s", digits=2),
    Figure("rss_mib", "server peak RSS, MiB", digits=1),
]

#: The classic logger writes through Python's buffered file: the last partial buffer reaches
#: the OS only at shutdown, so "visible" for it means all but that buffer.
PYTHON_FILE_BUFFER = 8192


def log_file(workdir: Path) -> Path:
    return workdir / "lines.log"


def socat_log(workdir: Path) -> Server:
    socat = require_tool("socat", "apt-get install socat")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
        socat,
        "-u",
        f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
        f"OPEN:{log_file(workdir)},creat,append",
    ]
    return Server("socat", argv, workdir, port=port)


def twistnet_log(
    baseline: Path | None, twistd_options: tuple[str, ...] = ()
) -> Callable[[Path], Server]:
    def make(workdir: Path) -> Server:
        workdir.mkdir(parents=True, exist_ok=True)
        args = ("--file", str(log_file(workdir)), "--format", "raw", "--max-connections", "0")
        return twistnet("twistnet-log", *args, baseline=baseline, twistd_options=twistd_options)(
            workdir
        )

    return make


def classic_log(workdir: Path) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    return Server(
        "classic LogfileFactory",
        python_peer("log_classic.py", "0", str(log_file(workdir))),
        workdir,
    )


def check_lines(path: Path, expected: int, size: int) -> None:
    """After the clock: at least C{expected} lines in the file, every one whole."""
    data = path.read_bytes()
    found = data.count(b"\n")
    if found < expected:
        raise Failed(f"only {found:,} of {expected:,} lines in the file")
    if any(len(line) != size - 1 for line in data[:-1].split(b"\n")[:expected]):
        raise Failed("a line in the file is not whole (split, merged or changed)")


def run_log(workload: Workload, settings: Settings, servers: dict[str, Server]) -> None:
    connections, lines, size = settings.log
    total = connections * lines * size
    held = {contender.name: contender.held_bytes for contender in workload.contenders}
    framed = {contender.name: contender.framed for contender in workload.contenders}
    section = next(s for s in workload.sections if s.key == "log")

    def measure(name: str, server: Server) -> dict[str, float]:
        path = log_file(server.workdir)
        # Truncation keeps the file the server holds open (append mode writes at the new end).
        os.truncate(path, 0) if path.exists() else None
        planned = total / 5e6
        argv = [
            binary("log_pusher"),
            server.port,
            connections,
            lines,
            size,
            path,
            total - held[name],
            int((planned + SLACK_SECONDS) * 1000),
        ]
        summary, peak = run_loadgen(argv, server, planned + SLACK_SECONDS)
        if summary.get("failure"):
            raise Failed(
                f"{summary['file_bytes']:,} of {summary['expected_bytes']:,} bytes visible: "
                f"{summary['failure']}"
            )
        if framed[name]:
            check_lines(path, connections * lines - held[name] // size, size)
        return {
            "lines_per_s": summary["lines_per_s"],
            "mib_per_s": summary["mib_per_s"],
            "visible_s": summary["visible_s"],
            "rss_mib": mib(peak),
        }

    interleave(section, servers, settings, measure)


def log_workload(settings: Settings) -> Workload:
    connections, lines, size = settings.log
    workload = Workload(
        "log",
        [
            *twistnet_contenders(settings, "twistnet-log", twistnet_log),
            Contender("classic LogfileFactory", classic_log, held_bytes=PYTHON_FILE_BUFFER),
            Contender(
                "socat",
                socat_log,
                framed=False,
                idle=False,
                idle_note="one process per connection: not comparable",
            ),
        ],
        run_log,
    )
    new_sections(
        workload,
        [
            Section(
                "log",
                f"log: {connections} connections x {lines:,} lines x {size} B, until in the file",
                LOG_FIGURES,
                note=(
                    "After each run every line is checked to be in the file whole, except "
                    "for socat, which has no framing: its connections' bytes interleave "
                    "mid-line, so it is checked for the byte count only. The classic "
                    "LogfileFactory counts as done when all but its last 8 KiB are in the "
                    "file: the rest waits in Python's file buffer until shutdown."
                ),
            )
        ],
    )
    workload.idle_title = f"log: memory per idle connection ({settings.idle:,} idle clients)"
    return workload


# --- http ---------------------------------------------------------------------------------------

HTTP_FIGURES = [
    Figure("requests_per_s", "requests/s"),
    Figure("p50_ms", "p50 ms", digits=2),
    Figure("p99_ms", "p99 ms", digits=2),
    Figure("errors", "non-2xx or errors"),
    Figure("rss_mib", "server peak RSS, MiB", digits=1),
]
POST_FIGURES = [Figure("jobs_per_s", "durable jobs/s (202)"), *HTTP_FIGURES[1:]]

#: The job submitted first, whose JSON GET serves: the harmless built-in echo tool.
POST_BODY = {"tool": "echo", "params": {"text": "benchmark"}}

#: Far above the benchmark's connection count (the service's default is 20) and a queue deep
#: enough that submissions are not refused while the workers run the jobs.
HTTP_ARGS = ("--max-connections", "20000", "--queue-size", "10000000", "--db", "jobs.db")

#: This checkout's twistnet-http also caps requests in progress (default 20); the baseline
#: (before --max-requests existed) would refuse the option, so it gets HTTP_ARGS alone.
HTTP_ARGS_NOW = (*HTTP_ARGS, "--max-requests", "20000")

#: The job JSON served by the peers when twistnet-http cannot provide a real one.
FALLBACK_JOB = {
    "id": "0123456789abcdef",
    "tool": "echo",
    "params": {"text": "benchmark"},
    "status": "succeeded",
    "exit_code": 0,
    "output": "benchmark\n",
    "truncated": False,
    "result": None,
    "created": "2026-01-01T00:00:00Z",
    "started": "2026-01-01T00:00:00Z",
    "finished": "2026-01-01T00:00:00Z",
    "duration": 0.002,
}

WRK_POST_SCRIPT = Path(__file__).parent / "wrk_post.lua"


@dataclass
class HttpState:
    job_path: str = "/jobs/0123456789abcdef"
    body_file: Path | None = None


def http_request(port: int, method: str, path: str, body: bytes | None = None):
    connection = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Location"), response.read()
    finally:
        connection.close()


def wrk(port: int, path: str, settings: Settings, script: Path | None = None) -> dict[str, float]:
    tool = require_tool("wrk", "apt-get install wrk")
    threads = max(1, min(2, settings.http_connections))
    argv = [
        tool,
        "-t",
        str(threads),
        "-c",
        str(settings.http_connections),
        "-d",
        f"{max(1, round(settings.duration))}s",
        "--latency",
    ]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}{path}")
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=settings.duration + SLACK_SECONDS, check=False
    )
    if done.returncode != 0:
        raise Failed(f"wrk failed: {done.stderr.strip()[-300:]}")
    return parse_wrk(done.stdout)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise Failed(f"unreadable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    """Requests/s, p50 and p99 latency and the failed responses from wrk's report."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if not rate or not total:
        raise Failed(f"unreadable wrk output: {output.strip()[-300:]}")
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    requests = int(total.group(1))
    seconds = _ms(total.group(2) + total.group(3)) / 1000.0
    return {
        "requests_per_s": float(rate.group(1)),
        "ok_per_s": max(0, requests - (int(non_2xx.group(1)) if non_2xx else 0)) / seconds,
        "p50_ms": _ms(p50.group(1)) if p50 else 0.0,
        "p99_ms": _ms(p99.group(1)) if p99 else 0.0,
        "errors": float(errors),
    }


def with_peak_rss(server: Server, work: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run C{work} in the foreground while a thread samples the server's RSS."""
    import threading

    peak = [server.rss_kib()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            if server.alive():
                peak[0] = max(peak[0], server.rss_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        stop.set()
        sampler.join()
    return {**result, "rss_mib": mib(peak[0])}


def run_http(workload: Workload, settings: Settings, servers: dict[str, Server]) -> None:
    get = next(s for s in workload.sections if s.key == "http-get")
    post = next(s for s in workload.sections if s.key == "http-post")
    state = workload.state  # type: ignore[attr-defined]

    def measure_get(name: str, server: Server) -> dict[str, float]:
        # Each twistnet server (this checkout's, the baseline's) serves its own first job.
        path = server.job_path if isinstance(server, JobServer) else state.job_path
        return with_peak_rss(server, lambda: wrk(server.port, path, settings))

    interleave(get, servers, settings, measure_get)
    stores = {}
    for contender in workload.contenders:
        if not contender.twistnet:
            post.row(contender.name).missing = "a bare handler stores no job: twistnet only"
        elif contender.name in servers:
            stores[contender.name] = servers[contender.name]
    if not stores:
        return

    def measure_post(name: str, server: Server) -> dict[str, float]:
        result = with_peak_rss(server, lambda: wrk(server.port, "/jobs", settings, WRK_POST_SCRIPT))
        return {**result, "jobs_per_s": result["ok_per_s"]}

    interleave(post, stores, settings, measure_post)


def http_peer(name: str, script: str, state: HttpState, module: str | None = None):
    def make(workdir: Path) -> Server:
        if module:
            require_module(module)
        if state.body_file is None:
            workdir.mkdir(parents=True, exist_ok=True)
            state.body_file = workdir / "job.json"
            state.body_file.write_bytes(json.dumps(FALLBACK_JOB).encode())
        return Server(name, python_peer(script, "0", str(state.body_file)), workdir)

    return make


class JobServer(TwistdServer):
    """twistnet-http, which on start gets one job done so GET has a real job to serve."""

    def __init__(
        self,
        state: HttpState,
        workdir: Path,
        baseline: Path | None = None,
        twistd_options: tuple[str, ...] = (),
    ) -> None:
        args = HTTP_ARGS if baseline is not None else HTTP_ARGS_NOW
        super().__init__("twistnet-http", args, workdir, baseline, twistd_options)
        self.state = state
        self.job_path = state.job_path

    def start(self) -> int:
        port = super().start()
        try:
            location, body = self.first_job(port)
        except (OSError, HTTPException, ValueError) as error:
            self.stop()
            raise Missing(
                f"a first POST /jobs and GET failed: {error!r}; {self.problem()}"
            ) from None
        self.job_path = location
        if self.state.body_file is None:
            # The first twistnet-http to start gives the peers their job JSON to serve.
            self.state.job_path = location
            self.state.body_file = self.workdir / "job.json"
            self.state.body_file.write_bytes(body)
        return port

    def first_job(self, port: int) -> tuple[str, bytes]:
        """Submit a job and wait for it to finish: its location and its JSON."""
        status, location, _ = http_request(port, "POST", "/jobs", json.dumps(POST_BODY).encode())
        if status != 202 or not location:
            raise ValueError(f"POST /jobs answered {status}, not 202 with a Location")
        deadline = time.monotonic() + 30
        while True:
            status, _, body = http_request(port, "GET", location)
            finished = status == 200 and json.loads(body).get("status") not in ("queued", "running")
            if finished or time.monotonic() > deadline:
                return location, body
            time.sleep(0.05)


def twistnet_http(
    state: HttpState, baseline: Path | None = None, twistd_options: tuple[str, ...] = ()
) -> Callable[[Path], Server]:
    return lambda workdir: JobServer(state, workdir, baseline, twistd_options)


def http_workload(settings: Settings) -> Workload:
    state = HttpState()
    workload = Workload(
        "http",
        [
            *twistnet_contenders(
                settings,
                "twistnet-http",
                lambda baseline, options: twistnet_http(state, baseline, options),
            ),
            Contender(
                "bare twisted.web", http_peer("bare twisted.web", "http_twisted_web.py", state)
            ),
            Contender(
                "bare aiohttp", http_peer("bare aiohttp", "http_aiohttp.py", state, "aiohttp")
            ),
        ],
        run_http,
    )
    workload.state = state  # type: ignore[attr-defined]
    conns = settings.http_connections
    new_sections(
        workload,
        [
            Section("http-get", f"http: GET /jobs/{{id}}, {conns} connections (wrk)", HTTP_FIGURES),
            Section(
                "http-post",
                f"http: POST /jobs, {conns} connections (wrk), each job stored before the 202",
                POST_FIGURES,
            ),
        ],
    )
    workload.idle_title = f"http: memory per idle connection ({settings.idle:,} idle clients)"
    return workload


# --- the whole --------------------------------------------------------------------------------

WORKLOADS = {
    "echo": echo_workload,
    "chat": chat_workload,
    "log": log_workload,
    "http": http_workload,
}

TARGETS = [
    Target("echo 1 KiB: twistnet >= 1.4x wire.Echo", "echo-1k", "wire.Echo", 1.4),
    Target("echo 1 KiB: twistnet >= 0.95x asyncio (per core)", "echo-1k", "asyncio", 0.95),
    Target("echo 64 KiB: twistnet >= 0.5x asyncio", "echo-64k", "asyncio", 0.5),
    Target(
        "chat at 1,000 clients: twistnet >= 1.2x the classic chat",
        "chat-1000",
        "classic Twisted chat",
        1.2,
    ),
    Target(
        "chat 200 clients: twistnet >= 1.0x the classic chat", "chat", "classic Twisted chat", 1.0
    ),
    Target("log: twistnet >= 0.5x socat", "log", "socat", 0.5),
    Target("HTTP GET: twistnet >= 1.0x bare twisted.web", "http-get", "bare twisted.web", 1.0),
    Target("HTTP POST: >= 2,000 durable jobs/s", "http-post", None, 2000),
    Target("echo memory per idle connection < 2x wire.Echo", "echo-idle", "wire.Echo", 2.0, True),
    Target(
        "chat memory per idle client < 2x the classic chat",
        "chat-idle",
        "classic Twisted chat",
        2.0,
        True,
    ),
    Target(
        "log memory per idle connection < 2x the classic LogfileFactory",
        "log-idle",
        "classic LogfileFactory",
        2.0,
        True,
    ),
    Target(
        "http memory per idle connection < 2x bare twisted.web",
        "http-idle",
        "bare twisted.web",
        2.0,
        True,
    ),
]


def run_workload(name: str, settings: Settings) -> list[Section]:
    workload = WORKLOADS[name](settings)
    print(f"-- {name}: starting {len(workload.contenders)} servers", flush=True)
    servers = start_all(workload, settings)
    try:
        workload.run(workload, settings, servers)
    finally:
        for server in servers.values():
            server.stop()
    print(f"-- {name}: memory per idle connection", flush=True)
    measure_idle(workload, settings, workload.idle_title)
    return workload.sections
