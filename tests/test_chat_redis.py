"""
The chat across processes: real C{twistd -n twistnet-chat --redis ...} servers on one real
redis-server, with telnet-like (CR LF) and nc-like (LF) clients on different servers.
"""

from __future__ import annotations

from redis_support import redis_server_fixture  # noqa: F401  (the redis_server fixture)

from chat_helpers import ChatClient
from helpers import recv_until_closed

#: Liveness TTL for the tests: a dead server is noticed within a few seconds.
TTL = "2"


def start_shared(twistd, redis, *args: str):
    server = twistd(
        "twistnet-chat",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--redis",
        redis.url,
        "--redis-ttl",
        TTL,
        *args,
    )
    server.tcp_port = server.port()
    server.wait_for_line("chat room shared through Redis")
    return server


def said(client: ChatClient, count: int, marker: bytes = b"said ") -> list[bytes]:
    """The next C{count} lines holding C{marker} that C{client} receives, in order."""
    lines = []
    for _ in range(count):
        line = client.wait_for(marker)
        lines.append(line[line.index(marker) :])
    return lines


def test_telnet_and_nc_on_two_servers_talk_in_one_order(twistd, redis_server):
    a = start_shared(twistd, redis_server, "--rate", "0")
    b = start_shared(twistd, redis_server, "--rate", "0")
    with (
        ChatClient(a.tcp_port, eol=b"\r\n") as telnet,
        ChatClient(b.tcp_port) as nc,
        ChatClient(a.tcp_port) as third,
    ):
        assert telnet.name != nc.name != third.name, "guest names unique across servers"
        telnet.wait_for(f"{third.name} has joined".encode())
        telnet.rename("tel")
        nc.rename("Nc")
        third.rename("third")
        telnet.send("/name NC")
        assert b"NC': Nc is already taken" in telnet.wait_for(b"Cannot take the name")
        # Three senders on two servers at once: everyone sees one order, own lines excepted.
        for i in range(20):
            telnet.send(f"said tel {i}")
            nc.send(f"said nc {i}")
            third.send(f"said third {i}")
        seen = {
            "tel": said(telnet, 40),
            "nc": said(nc, 40),
            "third": said(third, 40),
        }
        for who, lines in seen.items():
            assert not any(f"said {who} ".encode() in line for line in lines), who
            for sender in {"tel", "nc", "third"} - {who}:
                mine = [line for line in lines if line.startswith(f"said {sender} ".encode())]
                assert mine == [f"said {sender} {i}".encode() for i in range(20)], (who, sender)
        # Every two views agree on the order of the lines both saw.
        for first, second in (("tel", "nc"), ("tel", "third"), ("nc", "third")):
            shared = set(seen[first]) & set(seen[second])
            assert len(shared) == 20
            assert [x for x in seen[first] if x in shared] == [
                x for x in seen[second] if x in shared
            ], (first, second)
        nc.send("/MSG TEL just between us", "/who")
        assert telnet.wait_for(b"[private]") == b"[private] Nc: just between us"
        assert nc.wait_for(b"***   ") == b"***   Nc tel third"
        nc.send("/quit")
        assert recv_until_closed(nc.sock).endswith(b"*** Goodbye, Nc.\r\n")
        assert telnet.wait_for(b"has left") == b"*** Nc has left (quit)"
    for server in (a, b):
        assert "Traceback" not in server.output
