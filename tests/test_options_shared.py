"""What every service's options share: readable --help, sizes with K/M/G everywhere."""

from __future__ import annotations

import re

import pytest

from twistnet import echo
from twistnet.chat import tap as chat_tap
from twistnet.http import tap as http_tap
from twistnet.log import tap as log_tap

SERVICES = {"echo": echo, "chat": chat_tap, "log": log_tap, "http": http_tap}


@pytest.mark.parametrize("name", SERVICES)
def test_help_reads_cleanly(name):
    options = SERVICES[name].Options()
    text = str(options)
    assert not re.search(r"(?<!\.)\.\.(?!\.)", text), "a doubled period (an ellipsis is fine)"
    assert "[default: ]" not in text
    for flag, doc in options.docs.items():
        assert not re.search(r"\s{2,}", (doc or "").strip()), (flag, doc)


@pytest.mark.parametrize(
    ("name", "argv", "key", "value"),
    [
        ("chat", ["--max-line", "8K"], "max-line", 8192),
        ("chat", ["--sendq", "1M"], "sendq", 1024**2),
        ("http", ["--max-body", "2M"], "max-body", 2 * 1024**2),
        ("log", ["--max-line", "4K"], "max-line", 4096),
        ("log", ["--rotate-bytes", "1G"], "rotate-bytes", 1024**3),
    ],
)
def test_every_size_option_takes_k_m_g(monkeypatch, tmp_path, name, argv, key, value):
    monkeypatch.chdir(tmp_path)
    options = SERVICES[name].Options()
    options.parseOptions(argv)
    assert options[key] == value
