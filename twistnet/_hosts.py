"""
Which C{Host} a web service answers for: the defence against DNS rebinding.

A rebinding attack points a name the attacker owns at this server's address once a victim's
browser has loaded the attacker's page; the page then talks to this server as its own
origin, past the same-origin policy, but the browser still sends the attacker's name as
C{Host}. So a request naming an IP address (the browser connected to it as such: nothing
was rebound), C{localhost}, or a name the operator allowed is answered; any other name is
refused. A request without C{Host} comes from no browser (every browser sends one) and has
nothing to rebind. Shared by the chat's web face and twistnet-http.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

#: A Host header: a bracketed IPv6 literal or a name (or IPv4 literal), then perhaps a port.
_HOST = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_.-]+))(?::[0-9]{1,5})?\Z")
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}\Z")
#: Accepted Host values remembered, so the usual one costs a set lookup. Bounded: a client
#: chooses what it sends (and only accepted values are remembered).
REMEMBERED_HOSTS = 64


def host_name(host: str) -> str | None:
    """
    The name or address a C{Host} value names (lower case, no port, no brackets, no final
    dot); C{None} when it is none.
    """
    match = _HOST.match(host.strip().lower())
    if match is None:
        return None
    if match["v6"] is not None:
        try:
            return str(ipaddress.IPv6Address(match["v6"]))
        except ValueError:
            return None
    return match["name"].rstrip(".") or None


def is_ip_address(name: str) -> bool:
    """Whether C{name} (from L{host_name}) is an IP literal, which no DNS answer can rebind."""
    if ":" in name:
        return True  # host_name gives a colon only in a valid IPv6 address
    if _IPV4.match(name) is None:
        return False
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def allowed_host(value: str) -> str:
    """Coerce an allowed host name option: a DNS name, without port or scheme."""
    name = host_name(value)
    if name is None or ":" in value or is_ip_address(name):
        raise ValueError(
            f"expected a host name such as jobs.example.org (IP addresses and localhost are "
            f"always allowed), got {value!r}"
        )
    return name


allowed_host.coerceDoc = "A host name, no port."  # type: ignore[attr-defined]


class HostAllowList:
    """The C{Host} values a service answers for: IP literals, C{localhost} and C{names}."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = frozenset(name.lower().rstrip(".") for name in names) | {"localhost"}
        self._accepted: set[bytes | str] = set()

    def allows(self, host: bytes | str | None) -> bool:
        """Whether a request with this C{Host} header (C{None}: none sent) is answered."""
        if host is None or host in self._accepted:
            return True
        name = host_name(host.decode("latin-1") if isinstance(host, bytes) else host)
        if name is None or not (name in self.names or is_ip_address(name)):
            return False
        if len(self._accepted) < REMEMBERED_HOSTS:
            self._accepted.add(host)
        return True
