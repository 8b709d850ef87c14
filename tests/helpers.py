"""Helpers for tests that talk to twistnet the way users do: child processes and raw sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

TWISTD = str(Path(sys.executable).parent / "twistd")

#: The reactor the suite runs on, in the test process and in every twistd it starts: twistnet's
#: (the services' default) unless TWISTNET_REACTOR=stock asks for Twisted's stock epoll reactor.
SUITE_REACTOR = os.environ.get("TWISTNET_REACTOR", "twistnet")
if SUITE_REACTOR not in ("twistnet", "stock"):
    raise SystemExit(f"TWISTNET_REACTOR={SUITE_REACTOR!r}: expected 'twistnet' or 'stock'")

#: The twistd options that run a service on the suite's reactor (none: the default).
REACTOR_OPTIONS = ["--reactor", "epoll"] if SUITE_REACTOR == "stock" else []

#: Upper bound for anything a test waits for; generous so a loaded CI machine does not flake.
WAIT_SECONDS = 20.0

_LISTENING = re.compile(r"(?P<service>twistnet-\w+) listening on (?P<host>[^\s]+):(?P<port>\d+)")


def wait_until(predicate: Callable[[], object], timeout: float = WAIT_SECONDS, interval=0.01):
    """Poll C{predicate} until it returns something true, for at most C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate!r}")
        time.sleep(interval)


async def eventually(
    predicate: Callable[[], object],
    message: str = "the condition never held",
    timeout: float = WAIT_SECONDS,
    interval: float = 0.01,
):
    """
    The first true result of C{predicate()}, polled without blocking the reactor, for at
    most C{timeout} seconds; fails with C{message} if it never comes. The suite's one async
    poller (L{wait_until} is its blocking twin, for threads and child processes).
    """
    from twisted.internet import reactor, task

    deadline = reactor.seconds() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"{message} (waited {timeout} s)")
        await task.deferLater(reactor, interval, lambda: None)


class TwistdProcess:
    """
    C{twistd -n PLUGIN ARGS} as a child process, its log collected line by line; on the
    suite's reactor unless C{twistd_options} (placed before the plugin) say otherwise.
    """

    def __init__(
        self,
        plugin: str,
        *args: str,
        cwd: str | os.PathLike | None = None,
        env=None,
        twistd_options: list[str] | None = None,
    ):
        options = REACTOR_OPTIONS if twistd_options is None else twistd_options
        self.argv = [TWISTD, *options, "-n", "--pidfile=", plugin, *args]
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = WAIT_SECONDS) -> re.Match:
        """The first log line matching C{pattern}; fails if the process exits or time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if not self._reader.is_alive():
                    raise AssertionError(
                        f"twistd exited ({self.proc.poll()}) before logging {pattern!r}:\n"
                        + self.output_unlocked()
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no log line matching {pattern!r} in {timeout}s:\n"
                        + self.output_unlocked()
                    )
                self._changed.wait(remaining)

    def output_unlocked(self) -> str:
        return "\n".join(self.lines)

    def port(self, kind: str = "tcp") -> int:
        """The port the service announced for C{kind} ('tcp' or 'udp')."""
        if kind == "udp":
            match = self.wait_for_line(r"listening on [^\s]+:(?P<port>\d+) \(udp\)")
        else:
            match = self.wait_for_line(r"listening on [^\s]+:(?P<port>\d+) \((tcp|ssl)")
        return int(match.group("port"))

    def rss_kib(self) -> int:
        """Resident memory of the server process, in KiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def terminate(self, timeout: float = WAIT_SECONDS) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL and fail if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"twistd did not exit within {timeout}s of SIGTERM") from None
        finally:
            self._reader.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)


def turned_away(output: str) -> int:
    """
    How many connections a service's log says it refused or evicted: the first of a burst is
    logged alone, the rest are counted in a summary line a second.
    """
    alone = len(re.findall(r"(?:refused|evicted \(waited longest\)) at --max-\S+ \d+: ", output))
    summarized = sum(int(n) for n in re.findall(r"(\d+) more connections turned away", output))
    return alone + summarized


def run_twistd(plugin: str, *args: str, timeout: float = WAIT_SECONDS, cwd=None):
    """Run twistd to completion (for options that must make it exit)."""
    return subprocess.run(
        [TWISTD, *REACTOR_OPTIONS, "-n", "--pidfile=", plugin, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def connect(port: int, host: str = "127.0.0.1", timeout: float = WAIT_SECONDS) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    return sock


def recv_until(sock: socket.socket, predicate: Callable[[bytes], bool], timeout=WAIT_SECONDS):
    """Read from C{sock} until C{predicate(received)} holds; returns all bytes received."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    while not predicate(bytes(received)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out; received so far: {bytes(received[-500:])!r}")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            if predicate(bytes(received)):
                break
            raise AssertionError(f"connection closed; received: {bytes(received[-500:])!r}")
        received += chunk
    return bytes(received)


def recv_exactly(sock: socket.socket, count: int, timeout=WAIT_SECONDS) -> bytes:
    return recv_until(sock, lambda data: len(data) >= count, timeout)


def recv_until_closed(sock: socket.socket, timeout=WAIT_SECONDS) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"server did not close; received: {bytes(received[-500:])!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk


def make_certificate(directory: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """
    A throwaway self-signed key and certificate for TLS tests, valid for C{hostname} and
    127.0.0.1; returns the (key, cert) paths.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def tls_client(port: int, cert_path: Path, hostname: str = "localhost"):
    """A TLS client socket to 127.0.0.1:C{port} trusting only C{cert_path}."""
    import ssl

    context = ssl.create_default_context(cafile=str(cert_path))
    raw = connect(port)
    return context.wrap_socket(raw, server_hostname=hostname)


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it); returns the new limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))  # root may raise hard
            hard = wanted
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def figure(name: str, value: float, unit: str = "") -> None:
    """Print a measured figure; `pytest -s -k ... | grep FIGURE` collects them for the docs."""
    print(f"FIGURE {name} = {value:.6g} {unit}".rstrip())


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
