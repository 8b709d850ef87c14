"""The Host allow-list shared by twistnet-http and the chat's web face (twistnet/_hosts.py)."""

from __future__ import annotations

import pytest

from twistnet._hosts import REMEMBERED_HOSTS, HostAllowList, allowed_host, host_name


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.1:8901", "127.0.0.1"),
        ("[::1]:8901", "::1"),
        ("[0:0::1]", "::1"),
        ("Jobs.Example.ORG.:443", "jobs.example.org"),
        ("::1", None),  # an IPv6 literal in Host is bracketed (RFC 3986)
        ("[not-ip]", None),
        ("evil.example@127.0.0.1", None),
        ("a b", None),
        ("", None),
        ("host:port", None),
    ],
)
def test_host_name_of_a_host_header(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize(
    "header",
    [b"127.0.0.1", b"10.1.2.3:8901", b"[::1]:8901", b"[2001:db8::1]", b"localhost:8901", None],
)
def test_ip_addresses_localhost_and_no_host_at_all_are_allowed(header):
    assert HostAllowList().allows(header)


@pytest.mark.parametrize(
    "header",
    [b"evil.example", b"evil.example:8901", b"127.0.0.1.nip.io", b"999.0.0.1", b"x", b""],
)
def test_any_other_name_is_refused_unless_allowed(header):
    assert not HostAllowList().allows(header)
    name = host_name(header.decode())
    if name is not None:
        assert HostAllowList([name]).allows(header)


def test_the_remembered_hosts_stay_bounded_and_refusals_are_never_remembered():
    hosts = HostAllowList(["jobs.example"])
    for number in range(REMEMBERED_HOSTS * 2):
        assert hosts.allows(f"10.0.0.1:{number}".encode())
        assert not hosts.allows(f"evil{number}.example".encode())
    assert len(hosts._accepted) == REMEMBERED_HOSTS
    assert not hosts.allows(b"evil0.example")


@pytest.mark.parametrize("value", ["jobs.example:8901", "127.0.0.1", "[::1]", "http://a.example"])
def test_an_allowed_host_option_is_a_name_without_port(value):
    assert allowed_host("Jobs.Example.") == "jobs.example"
    with pytest.raises(ValueError, match="expected a host name"):
        allowed_host(value)
