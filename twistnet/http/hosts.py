"""
DNS-rebinding protection of twistnet-http without a token: each request's C{Host} is checked
against the allow-list (L{twistnet._hosts}) before any handler runs; with C{--token} the
check is off (a rebinding page has no token). A refusal is a JSON 400, as Django's
C{ALLOWED_HOSTS} and Starlette's C{TrustedHostMiddleware} answer, naming the option that
allows the name, and a line in the operator's log, rate-limited with the other refusals.
"""

from __future__ import annotations

import re

from twisted.logger import Logger
from twisted.web import server

from twistnet._connections import peer_name
from twistnet._hosts import HostAllowList, host_name
from twistnet.http._logging import observer as log_observer
from twistnet.http.errors import ApiError

log = Logger(observer=log_observer)

#: A refused name is repeated to the client only when it looks like one (and is short).
_PLAIN_NAME = re.compile(r"[a-z0-9_.-]{1,100}\Z")
REFUSED = "refused: Host not in --allowed-host"


def check_host(request: server.Request, hosts: HostAllowList) -> None:
    """Raise a 400 L{ApiError} when C{request}'s C{Host} names a server not allowed."""
    host = request.getHeader(b"host")
    if hosts.allows(host):
        return
    text = host.decode("latin-1")  # allows() took None: here there is a header
    name = host_name(text)
    shown = name if name is not None and _PLAIN_NAME.match(name) else "NAME"
    peer = f"{peer_name(request.transport)} (Host {text[:100]!r})"
    refusals = getattr(request.channel.site, "refusals", None)
    if refusals is not None:
        refusals.record(REFUSED, peer)
    else:
        log.info("{reason}: {peer}", reason=REFUSED, peer=peer)
    raise ApiError(
        400,
        "host not allowed",
        f"This server answers for its IP addresses, localhost and the names given with "
        f"--allowed-host; to reach it by this name, start it with --allowed-host {shown} "
        f"(or set a --token).",
    )
