"""The --redis options: URLs, passwords from a file, refusals; the service they build."""

from __future__ import annotations

from collections import deque

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from twistnet import chat
from twistnet.chat.redis_room import RedisRoom, RedisUrlError, _unpack, parse_redis_url


def parse(*argv: str) -> chat.Options:
    options = chat.Options()
    options.parseOptions(list(argv))
    return options


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", ("redis", "localhost", 6379, "", 0, None, None)),
        ("redis://h:7000/3", ("redis", "h", 7000, "", 3, None, None)),
        ("redis://chat:s%40cret@h:1/0", ("redis", "h", 1, "", 0, "chat", "s@cret")),
        ("rediss://h:6380/1", ("rediss", "h", 6380, "", 1, None, None)),
        ("unix:///run/redis.sock?db=2", ("unix", "", 6379, "/run/redis.sock", 2, None, None)),
        ("unix://u:pw@/run/r.sock", ("unix", "", 6379, "/run/r.sock", 0, "u", "pw")),
    ],
)
def test_redis_urls_are_parsed(url, expected):
    s = parse_redis_url(url)
    assert (s.scheme, s.host, s.port, s.path, s.db, s.username, s.password) == expected


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel://h:26379/mymaster", "Sentinel and Redis Cluster are not supported"),
        ("redis://a:1,b:2/0", "Sentinel and Redis Cluster are not supported"),
        ("http://h", "takes redis://, rediss:// or unix://"),
        ("redis://h:port/0", "must be numbers"),
        ("redis:///0", "needs a host"),
        ("unix://", "needs a socket path"),
    ],
)
def test_unusable_redis_urls_say_why(url, why):
    with pytest.raises(RedisUrlError, match=why):
        parse_redis_url(url)


def test_a_password_never_shows_in_the_settings_or_their_repr():
    settings = parse_redis_url("redis://chat:topsecret@h:1/0")
    assert "topsecret" not in settings.safe_url + repr(settings)
    assert settings.safe_url == "redis://chat:***@h:1/0"


def test_without_redis_nothing_changes():
    options = parse()
    assert options["redis-settings"] is None
    assert (options["redis-prefix"], options["redis-ttl"]) == ("twistnet", 10.0)


def test_redis_options_are_parsed_and_the_password_file_wins(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    options = parse(
        "--redis",
        "redis://chat:in-url@h:7000/2",
        "--redis-password-file",
        str(secret),
        "--redis-prefix",
        "other",
        "--redis-ttl",
        "2.5",
    )
    settings = options["redis-settings"]
    assert (settings.username, settings.password, settings.db) == ("chat", "from-file", 2)
    assert (options["redis-prefix"], options["redis-ttl"]) == ("other", 2.5)


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--redis-password-file", "x"], "--redis-password-file needs --redis"),
        (["--redis", "redis://h", "--redis-password-file", "/nonexistent"], "cannot read"),
        (["--redis", "redis://h", "--redis-ca", "ca.pem"], "only applies to a rediss://"),
        (["--redis", "redis://h", "--redis-ttl", "0"], "more than 0 seconds"),
        (["--redis", "redis-cluster://h"], "not supported"),
    ],
)
def test_bad_redis_options_are_usage_errors(argv, why):
    with pytest.raises(usage.UsageError, match=why):
        parse(*argv)


def test_a_missing_or_broken_ca_file_is_refused_at_start(tmp_path):
    broken = tmp_path / "ca.pem"
    broken.write_text("not a certificate")
    with pytest.raises(usage.UsageError, match="cannot read --redis-ca"):
        parse("--redis", "rediss://h", "--redis-ca", str(tmp_path / "missing.pem"))
    with pytest.raises(usage.UsageError, match="--redis-ca is not a PEM certificate"):
        parse("--redis", "rediss://h", "--redis-ca", str(broken))


def test_an_empty_password_file_is_refused(tmp_path):
    empty = tmp_path / "pw"
    empty.write_text("")
    with pytest.raises(usage.UsageError, match="is empty"):
        parse("--redis", "redis://h", "--redis-password-file", str(empty))


def test_make_service_with_redis_runs_the_shared_room_as_a_service():
    service = chat.makeService(parse("--redis", "redis://h:1/0"), MemoryReactorClock())
    rooms = [child for child in service if isinstance(child, RedisRoom)]
    assert len(rooms) == 1
    assert not any(
        isinstance(child, RedisRoom) for child in chat.makeService(parse(), MemoryReactorClock())
    )


# --- what the room does with the stream entries it reads (no Redis needed) -----------------


class Member:
    def __init__(self, name: str) -> None:
        self.name = name
        self.got: list[bytes] = []

    def deliver(self, encoded: bytes) -> None:
        self.got.append(encoded)


def room_with(*members: Member) -> RedisRoom:
    room = RedisRoom(connect=lambda refused: None, clock=MemoryReactorClock())
    for i, member in enumerate(members):
        room._member_ids[member] = str(i)
        room._by_id[str(i)] = member
    return room


def entry(seq: int, data: str, kind: str = "line", skip: str = "", to: str = ""):
    """What the room makes of a stream entry as the Lua scripts write it."""
    return _unpack(["seq", str(seq), "m", f"{kind} {skip} {to}\n{data}"])


def test_a_gap_in_the_sequence_tells_members_how_many_lines_they_missed():
    alice = Member("alice")
    room = room_with(alice)
    room._dispatch(entry(1, "bob: one\r\n"))
    room._dispatch(entry(5, "bob: five\r\n"))
    assert alice.got == [
        b"bob: one\r\n",
        b"*** This server fell behind: you missed 3 lines.\r\n",
        b"bob: five\r\n",
    ]


def test_an_entry_seen_before_is_not_delivered_twice():
    alice = Member("alice")
    room = room_with(alice)
    for seq in (1, 2, 2, 1, 3):
        room._dispatch(entry(seq, f"bob: {seq}\r\n"))
    assert alice.got == [b"bob: 1\r\n", b"bob: 2\r\n", b"bob: 3\r\n"]


def test_the_sender_is_skipped_and_a_private_line_reaches_only_its_owner():
    alice, bob = Member("alice"), Member("bob")
    room = room_with(alice, bob)
    room._dispatch(entry(1, "alice: hi\r\n", skip=f"{room.server_id}:0"))
    room._dispatch(entry(2, "[private] x: psst\r\n", kind="private", to=f"{room.server_id}:1"))
    room._dispatch(entry(3, "[private] x: no\r\n", kind="private", to="otherserver:1"))
    assert alice.got == []
    assert bob.got == [b"alice: hi\r\n", b"[private] x: psst\r\n"]
    assert room._history == deque([b"alice: hi\r\n"])


class Commands:
    """A Redis connection that records the scripts it is asked to run."""

    def __init__(self) -> None:
        self.scripts: list[tuple[str, list]] = []

    def eval(self, script: str, keys: list, args: list):
        from twisted.internet.defer import succeed

        self.scripts.append((script, args))
        return succeed(len(args))


def shared_room(*members: Member) -> tuple[RedisRoom, Commands, MemoryReactorClock]:
    room = room_with(*members)
    room._clock = clock = MemoryReactorClock()
    room._commands = commands = Commands()
    room._shared = room._running = True
    return room, commands, clock


def test_lines_of_one_turn_reach_redis_in_one_round_trip_in_order():
    from twistnet.chat import redis_lua

    alice, bob = Member("alice"), Member("bob")
    room, commands, clock = shared_room(alice, bob)
    room.broadcast(alice, ["alice: one"])
    room.broadcast(bob, ["bob: two", "bob: three"])
    room.announce("*** notice")
    assert commands.scripts == []
    clock.advance(0)
    [(script, args)] = commands.scripts
    assert script == redis_lua.SAY
    owner = room.server_id
    assert args[1:] == [
        *("line", f"{owner}:0", "alice: one\r\n"),
        *("line", f"{owner}:1", "bob: two\r\nbob: three\r\n"),
        *("notice", "", "*** notice\r\n"),
    ]
    assert not clock.getDelayedCalls()


def test_a_line_said_before_leaving_reaches_redis_before_the_departure():
    from twistnet.chat import redis_lua

    alice = Member("alice")
    room, commands, clock = shared_room(alice)
    room.broadcast(alice, ["alice: bye"])
    room.leave(alice, "quit")
    assert [script for script, _ in commands.scripts] == [redis_lua.SAY, redis_lua.LEAVE]
    assert "alice: bye\r\n" in commands.scripts[0][1]
    assert not clock.getDelayedCalls()


def test_redis_replies_are_parsed_by_hiredis():
    """
    txredisapi's own parser handles each bulk string of a reply in a reactor turn of its
    own (pause, callLater(0), resume): a stream read of 500 entries took 3,000 turns.
    """
    import txredisapi

    assert txredisapi.RedisProtocol is txredisapi.HiredisProtocol


def test_a_stream_entry_this_version_did_not_write_is_skipped_not_fatal():
    assert _unpack(["seq", "1", "kind", "line", "data", "x\r\n"]) is None
    assert _unpack(["seq", "1", "m", "garbage"]) is None
    assert _unpack(["seq", "7", "m", "line a:1 \nhi\r\n"]) == (7, "line", "a:1", "", "hi\r\n")


def test_a_read_of_several_lines_is_one_delivery_per_member_without_their_own_lines():
    alice, bob = Member("alice"), Member("bob")
    room = room_with(alice, bob)
    me = room.server_id
    room._dispatch(
        entry(1, "alice: one\r\n", skip=f"{me}:0"),
        entry(2, "carol: two\r\n", skip="otherserver:4"),
        entry(3, "[private] carol: psst\r\n", kind="private", to=f"{me}:1"),
        entry(4, "*** dave has joined\r\n", kind="notice"),
        entry(6, "bob: six\r\n", skip=f"{me}:1"),
    )
    assert alice.got == [
        b"carol: two\r\n",
        b"*** dave has joined\r\n",
        b"*** This server fell behind: you missed 1 lines.\r\n",
        b"bob: six\r\n",
    ]
    assert bob.got == [
        b"alice: one\r\ncarol: two\r\n",
        b"[private] carol: psst\r\n",
        b"*** dave has joined\r\n",
        b"*** This server fell behind: you missed 1 lines.\r\n",
    ]


def test_lines_pending_when_redis_is_lost_are_delivered_here_before_what_follows():
    alice, bob = Member("alice"), Member("bob")
    room, commands, clock = shared_room(alice, bob)
    room.broadcast(alice, ["alice: bye"])
    room._shared = False  # Redis lost within the same turn
    room.leave(alice, "quit")
    assert bob.got == [b"alice: bye\r\n", b"*** alice has left (quit)\r\n"]
    assert commands.scripts == []
    assert not clock.getDelayedCalls()
