"""
Real syslog senders against a real C{twistd -n twistnet-log} child: util-linux's C{logger}
(package bsdutils) over TCP with and without RFC 6587 octet counting and over UDP, and
rsyslogd forwarding with omfwd's octet-counted framing. C{.ci/run} installs both if missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from helpers import WAIT_SECONDS, wait_until
from log_helpers import logged_lines, start_log_server

LOGGER = shutil.which("logger")
RSYSLOGD = shutil.which("rsyslogd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def logger(*args: str) -> None:
    if LOGGER is None:
        pytest.fail("util-linux logger is not installed (tests/run installs bsdutils)")
    subprocess.run(
        [LOGGER, "-t", "twistnet-test", *args],
        check=True,
        timeout=WAIT_SECONDS,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


def lines_of(server, count: int) -> list[bytes]:
    wait_until(lambda: len(logged_lines(server.path)) >= count)
    return logged_lines(server.path)


def test_logger_octet_count_each_message_is_one_line_even_with_a_newline_inside(twistd, tmp_path):
    server = start_log_server(twistd, tmp_path)
    where = ["--tcp", "--octet-count", "-n", "127.0.0.1", "-P", str(server.tcp_port)]
    logger(*where, "first message")
    logger(*where, "two\nlines in one message")
    logger(*where, "a back\\slash")
    lines = lines_of(server, 3)
    assert len(lines) == 3
    assert lines[0].startswith(b"<13>1 ") and lines[0].endswith(b" first message")
    assert lines[1].endswith(b" two\\nlines in one message")
    assert lines[2].endswith(b" a back\\\\slash")
    assert server.terminate() == 0


def test_logger_tcp_without_octet_count_is_read_as_lines(twistd, tmp_path):
    server = start_log_server(twistd, tmp_path)
    where = ["--tcp", "-n", "127.0.0.1", "-P", str(server.tcp_port)]
    for n in range(3):
        logger(*where, f"plain tcp message {n}")
    lines = lines_of(server, 3)
    assert len(lines) == 3
    assert [line.rsplit(b" ", 1)[-1] for line in lines] == [b"0", b"1", b"2"]
    assert all(b"plain tcp message" in line and line.startswith(b"<13>") for line in lines)
    assert server.terminate() == 0


def test_logger_udp_each_datagram_is_one_json_record(twistd, tmp_path):
    server = start_log_server(
        twistd, tmp_path, "--udp-port", "0", "--udp-interface", "127.0.0.1", "--format", "json"
    )
    where = ["--udp", "-n", "127.0.0.1", "-P", str(server.port("udp"))]
    logger(*where, "udp one")
    logger(*where, "udp two\nlines")
    rows = [json.loads(line) for line in lines_of(server, 2)]
    assert len(rows) == 2
    texts = sorted(row["text"] for row in rows)  # datagrams need not arrive in order
    assert texts[0].endswith(" udp one") and texts[1].endswith(" udp two\nlines")
    assert all(row["peer"].startswith("127.0.0.1:") for row in rows)
    assert server.terminate() == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def rsyslogd(tmp_path):
    """C{start(target_port)}: an rsyslogd in tmp_path taking TCP on a free port, forwarding
    everything to C{target_port} with octet-counted framing; returns its input port."""
    if RSYSLOGD is None or LOGGER is None:
        pytest.fail("rsyslogd or logger is not installed (tests/run installs them)")
    processes: list[subprocess.Popen] = []

    def start(target_port: int) -> int:
        workdir = tmp_path / "rsyslog"
        workdir.mkdir()
        input_port = free_port()
        config = workdir / "rsyslog.conf"
        config.write_text(
            f'global(workDirectory="{workdir}")\n'
            'module(load="imtcp")\n'
            f'input(type="imtcp" port="{input_port}" address="127.0.0.1")\n'
            f'*.* action(type="omfwd" target="127.0.0.1" port="{target_port}" protocol="tcp" '
            'TCP_Framing="octet-counted")\n'
        )
        process = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(config), "-i", str(workdir / "rsyslogd.pid")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        wait_until(lambda: process.poll() is not None or port_accepts(input_port))
        assert process.poll() is None, "rsyslogd exited at start"
        return input_port

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_rsyslog_forwarding_octet_counted_lands_one_record_per_message(twistd, tmp_path, rsyslogd):
    # Octet counting forced: a stream in any other framing would be a malformed frame.
    server = start_log_server(twistd, tmp_path, "--framing", "octet-counted", "--format", "json")
    input_port = rsyslogd(server.tcp_port)
    for n in range(3):
        logger("--tcp", "--octet-count", "-n", "127.0.0.1", "-P", str(input_port), f"relay {n}")
    rows = [json.loads(line) for line in lines_of(server, 3)]
    assert len(rows) == 3
    assert [row["text"].rsplit(" ", 1)[-1] for row in rows] == ["0", "1", "2"]
    assert all(row["text"].startswith("<13>") and "relay" in row["text"] for row in rows)
    assert "closing" not in server.output, "rsyslog's connection was kept open"
    assert server.terminate() == 0
