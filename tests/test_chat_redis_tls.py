"""
The chat shared through Redis over TLS (C{rediss://} with C{--redis-ca}): real
C{twistnet-chat} servers on a real redis-server listening for TLS with a throwaway certificate.
"""

from __future__ import annotations

from redis_support import TlsRedisServer, tls_redis_server_fixture  # noqa: F401  (the fixture)

from chat_helpers import ChatClient
from helpers import make_certificate

#: The password the Redis ACL asks for: it must never reach a log.
PASSWORD = "tls-secret-Zq8"


def start_tls(twistd, url: str, ca, *args: str):
    server = twistd(
        "twistnet-chat",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--redis",
        url,
        "--redis-ca",
        str(ca),
        "--redis-ttl",
        "3",
        *args,
    )
    server.tcp_port = server.port()
    return server


def test_two_servers_talk_through_redis_over_tls(twistd, tls_redis_server, tmp_path):
    # One server logs in as an ACL user with a password from a file, after the handshake.
    tls_redis_server.cli("ACL", "SETUSER", "chat", "on", f">{PASSWORD}", "~*", "&*", "+@all")
    password_file = tmp_path / "redis-password"
    password_file.write_text(PASSWORD + "\n")
    port = tls_redis_server.tls_port
    a = start_tls(
        twistd,
        f"rediss://chat@localhost:{port}/0",
        tls_redis_server.ca,
        "--redis-password-file",
        str(password_file),
    )
    b = start_tls(twistd, tls_redis_server.tls_url, tls_redis_server.ca)
    with ChatClient(a.tcp_port) as alice, ChatClient(b.tcp_port, eol=b"\r\n") as bob:
        alice.wait_for(f"{bob.name} has joined".encode())
        alice.send("hello over TLS")
        assert b"hello over TLS" in bob.wait_for(b"hello over TLS")
    # Redis has no plain TCP port (--port 0): the chat could only have come through TLS.
    assert "cannot reach Redis" not in a.output + b.output
    assert "could not auth" not in a.output
    assert PASSWORD not in a.output
    clients = tls_redis_server.cli("CLIENT", "LIST")
    assert "user=chat" in clients


def test_a_server_not_signed_by_the_ca_is_refused_in_one_line_without_the_password(
    twistd, tls_redis_server, tmp_path
):
    _, other_ca = make_certificate(tmp_path)
    url = f"rediss://default:{PASSWORD}@localhost:{tls_redis_server.tls_port}/0"
    server = start_tls(twistd, url, other_ca)
    line = server.wait_for_line(r"cannot reach Redis.*certificate.*")
    output = server.output
    assert PASSWORD not in output
    assert "Traceback" not in output
    assert output.count("certificate verify failed") == 1, output
    assert "rediss://default:***@localhost" in line.group(0)


def test_a_certificate_for_another_host_is_refused_even_from_the_trusted_ca(twistd, tmp_path):
    redis = TlsRedisServer(tmp_path, hostname="redis.invalid")
    redis.start()
    try:
        server = start_tls(twistd, redis.tls_url, redis.ca)
        line = server.wait_for_line(r"cannot reach Redis.*")
        assert "does not name this host" in line.group(0)
        with ChatClient(server.tcp_port) as alone:
            alone.send("/who")
            # The server still serves its own members, alone.
            assert alone.name.encode() in alone.wait_for(alone.name.encode())
    finally:
        redis.stop()
    assert server.output.count("cannot reach Redis") == 1
