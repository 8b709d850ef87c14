"""
The chat across processes: real C{twistd -n twistnet-chat --redis ...} servers on one real
redis-server, with telnet-like (CR LF) and nc-like (LF) clients on different servers.
"""

from __future__ import annotations

import socket

from redis_support import redis_server_fixture  # noqa: F401  (the redis_server fixture)

from chat_helpers import ChatClient
from helpers import recv_until, recv_until_closed

#: Liveness TTL for the tests: a dead server is noticed within a few seconds.
TTL = "3"


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


def everything_until(client: ChatClient, needle: bytes, timeout: float = 20.0) -> bytes:
    """All that C{client} receives up to and including C{needle}; consumes it."""
    data = client.received + recv_until(
        client.sock, lambda got: needle in client.received + got, timeout
    )
    end = data.index(needle) + len(needle)
    client.received = data[end:]
    return data[:end]


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


def two_servers_two_people(twistd, redis_server):
    a = start_shared(twistd, redis_server)
    b = start_shared(twistd, redis_server)
    alice = ChatClient(a.tcp_port, eol=b"\r\n")
    bob = ChatClient(b.tcp_port)
    alice.wait_for(f"{bob.name} has joined".encode())
    alice.rename("alice")
    bob.rename("bob")
    return a, b, alice, bob


def test_a_killed_server_is_announced_gone_within_the_ttl_and_its_names_freed(twistd, redis_server):
    a, b, alice, bob = two_servers_two_people(twistd, redis_server)
    with alice, bob:
        b.kill()
        line = alice.wait_for(b"bob has left", timeout=4 * float(TTL) + 5)
        assert line == b"*** bob has left (their server stopped answering)"
        alice.send("/who")
        assert alice.wait_for(b"***   ") == b"***   alice"
        alice.send("/name BOB")
        alice.wait_for(b"is now known as BOB")
        assert alice.received.count(b"has left") == 0, "announced once"
    assert "Traceback" not in a.output


def test_sigterm_announces_the_server_members_departure_to_the_others(twistd, redis_server):
    a, b, alice, bob = two_servers_two_people(twistd, redis_server)
    with alice, bob:
        assert b.terminate() == 0
        assert b"shutting down" in recv_until_closed(bob.sock)
        assert alice.wait_for(b"bob has left") == b"*** bob has left (server shutting down)"
        alice.send("/who")
        assert alice.wait_for(b"***   ") == b"***   alice"
    assert "Traceback" not in a.output + b.output


def test_redis_restarting_mid_chat_is_told_survived_and_duplicates_nothing(twistd, redis_server):
    a, b, alice, bob = two_servers_two_people(twistd, redis_server)
    with alice, bob:
        alice.send("before")
        assert bob.wait_for(b"alice:") == b"alice: before"
        redis_server.kill()
        assert alice.wait_for(b"unreachable").startswith(b"*** The shared room is unreachable")
        bob.wait_for(b"unreachable")
        # Still served on its own server meanwhile.
        with ChatClient(a.tcp_port) as local:
            alice.wait_for(f"{local.name} has joined".encode())
            local.send("only here")
            assert alice.wait_for(b"only here").endswith(b"only here")
        redis_server.start()
        alice.wait_for(b"shared room is back", timeout=30)
        bob.wait_for(b"shared room is back", timeout=30)
        alice.send("after")
        bob.send("reply")
        alice.send("end of test")
        heard_by_bob = everything_until(bob, b"alice: end of test")
        assert heard_by_bob.count(b"alice: after") == 1, "nothing twice"
        assert b"only here" not in heard_by_bob
        assert everything_until(alice, b"bob: reply").count(b"bob: reply") == 1
        bob.send("/who")
        assert bob.wait_for(b"***   ") == b"***   alice bob"
    for server in (a, b):
        assert "Traceback" not in server.output
        server.wait_for_line("Redis unreachable")


def test_a_server_paused_past_its_ttl_finds_it_was_declared_dead_and_comes_back(
    twistd, redis_server
):
    import signal

    a, b, alice, bob = two_servers_two_people(twistd, redis_server)
    with alice, bob:
        b.proc.send_signal(signal.SIGSTOP)
        try:
            alice.wait_for(b"bob has left", timeout=4 * float(TTL) + 5)
            # Someone takes bob's name meanwhile.
            alice.rename("bob")
        finally:
            b.proc.send_signal(signal.SIGCONT)
        line = bob.wait_for(b"someone took the name bob", timeout=20)
        assert b"you are now guest-" in line
        newname = line.rsplit(b" ", 1)[1].rstrip(b".").decode()
        assert alice.wait_for(f"{newname} is back".encode())
        b.wait_for_line("declared dead")
        bob.send("still here")
        assert alice.wait_for(b"still here") == f"{newname}: still here".encode()
        alice.send("/who")
        assert alice.wait_for(b"***   ") == f"***   bob {newname}".encode()
    assert "Traceback" not in a.output + b.output


def test_an_acl_user_with_a_password_file_talks_and_the_password_never_reaches_a_log(
    twistd, redis_server, tmp_path
):
    password = "not-for-logs-7f3a"
    redis_server.cli("ACL", "SETUSER", "chat", "on", f">{password}", "~*", "&*", "+@all")
    redis_server.cli("ACL", "SETUSER", "default", "off")
    secret = tmp_path / "redis-password"
    secret.write_text(password + "\n")
    url = f"unix://chat@{redis_server.socket}?db=0"
    a = start_shared(twistd, redis_server, "--redis", url, "--redis-password-file", str(secret))
    b = start_shared(
        twistd, redis_server, "--redis", f"unix://chat:{password}@{redis_server.socket}"
    )
    with ChatClient(a.tcp_port) as alice, ChatClient(b.tcp_port) as bob:
        alice.wait_for(f"{bob.name} has joined".encode())
        bob.send("hello")
        assert alice.wait_for(b"hello") == f"{bob.name}: hello".encode()
    for server in (a, b):
        assert password not in server.output
        assert "unix://chat:***@" in server.output


def test_clients_gone_before_their_join_completed_leave_no_name_claimed(twistd, redis_server):
    a = start_shared(twistd, redis_server)
    for _ in range(30):
        socket.create_connection(("127.0.0.1", a.tcp_port)).close()
    with ChatClient(a.tcp_port) as last:
        last.send("/who")
        assert last.wait_for(b"***   ") == f"***   {last.name}".encode()
        assert redis_server.cli("HLEN", "{twistnet}:names") == "1"
    assert "Traceback" not in a.output
