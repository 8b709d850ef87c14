"""The chat service: room and protocol in memory, options, and end to end through twistd."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from zope.interface import implementer
from zope.interface.verify import verifyObject

from chat_helpers import (
    NO_LIMITS,
    ChatClient,
    hang_up,
    join,
    make_chat,
    now,
    peak_rss_kib,
    sent,
    take,
)
from helpers import connect, recv_until_closed
from twistnet import chat
from twistnet._internals import PauseCounter
from twistnet.chat.protocol import ChatLimits, ChatProtocol
from twistnet.chat.room import IMember, IRoom, Room, name_problem
from twistnet.chat.tap import SHUTDOWN_NOTICE, ChatCloser


@pytest.fixture
def logged():
    """Log events emitted during the test, as (level, formatted text)."""
    from twisted.logger import formatEvent

    events = []

    def observer(event):
        events.append((event.get("log_level"), formatEvent(event)))

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


# --- the room -------------------------------------------------------------------------------


@implementer(IMember)
class Member:
    def __init__(self, broken=False):
        self.name = ""
        self.got: list[bytes] = []
        self.broken = broken

    def deliver(self, encoded: bytes) -> None:
        if self.broken:
            raise OSError("broken member")
        self.got.append(encoded)


def test_room_provides_iroom_and_protocol_provides_imember():
    factory, _ = make_chat()
    proto, _ = join(factory)
    assert verifyObject(IRoom, Room())
    assert verifyObject(IMember, proto)


def test_join_gives_unique_provisional_names_and_announces_to_others():
    room = Room()
    alice, bob = Member(), Member()
    assert now(room.join(alice)) == "guest-1"
    assert now(room.join(bob)) == "guest-2"
    assert alice.got == [b"*** guest-2 has joined\r\n"]
    assert bob.got == []


def test_provisional_name_skips_a_name_someone_took():
    room = Room()
    first = Member()
    room.join(first)
    assert now(room.rename(first, "GUEST-2")) is None
    assert now(room.join(Member())) == "guest-3"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "at least one character"),
        ("x" * 33, "at most 32 characters"),
        ("two words", "printable characters, no spaces"),
        ("tab\there", "printable characters, no spaces"),
        ("bell\x07", "printable characters, no spaces"),
        ("nbsp\u00a0", "printable characters, no spaces"),
    ],
)
def test_bad_names_are_refused_with_a_reason(name, problem):
    assert problem in name_problem(name)
    room = Room()
    member = Member()
    room.join(member)
    assert problem in now(room.rename(member, name))
    assert member.name == "guest-1"


def test_good_names_have_up_to_32_printable_characters():
    for name in ("a", "x" * 32, "Zoë", "名前", "o'brien!"):
        assert name_problem(name) is None


def test_names_are_unique_ignoring_case_but_own_case_change_is_fine():
    room = Room()
    alice, bob = Member(), Member()
    room.join(alice)
    room.join(bob)
    assert now(room.rename(alice, "Alice")) is None
    assert now(room.rename(bob, "ALICE")) == "Alice is already taken"
    assert now(room.rename(alice, "alice")) is None
    assert now(room.rename(alice, "alice")) == "you are already called alice"
    assert now(room.who()) == ["alice", "guest-2"]
    assert bob.got[-1] == b"*** Alice is now known as alice\r\n"


def test_broadcast_encodes_once_and_skips_the_sender():
    room = Room()
    members = [Member() for _ in range(4)]
    for member in members:
        room.join(member)
    for member in members:
        member.got.clear()
    room.broadcast(members[0], ["guest-1: héllo"])
    assert members[0].got == []
    delivered = [member.got[0] for member in members[1:]]
    assert delivered[0] == "guest-1: héllo\r\n".encode()
    assert all(data is delivered[0] for data in delivered), "one bytes object for everyone"


def test_one_broken_member_does_not_stop_the_broadcast(logged):
    room = Room()
    before, broken, after = Member(), Member(broken=True), Member()
    for member in (before, broken, after):
        room.join(member)
    room.announce("*** hello all")
    assert before.got[-1] == after.got[-1] == b"*** hello all\r\n"
    assert any("delivery to guest-2 failed" in text for _, text in logged)


def test_history_keeps_the_last_n_broadcasts_oldest_first():
    room = Room(history_size=2)
    sender = Member()
    room.join(sender)
    room.broadcast(sender, ["a: 1"])
    room.broadcast(sender, ["a: 2", "a: 3"])
    room.announce("*** notices are not history")
    assert now(room.history()) == [b"a: 2\r\n", b"a: 3\r\n"]


def test_private_goes_to_that_member_only_and_names_ignore_case():
    room = Room()
    alice, bob, carol = Member(), Member(), Member()
    for member in (alice, bob, carol):
        room.join(member)
    room.rename(bob, "Bob")
    for member in (alice, bob, carol):
        member.got.clear()
    assert now(room.private(alice, "bOB", "psst"))
    assert not now(room.private(alice, "nobody", "psst"))
    assert bob.got == [b"[private] guest-1: psst\r\n"]
    assert alice.got == carol.got == []


def test_leave_is_announced_idempotent_and_can_be_silent():
    room = Room()
    alice, bob, carol = Member(), Member(), Member()
    for member in (alice, bob, carol):
        room.join(member)
    room.leave(alice, "quit")
    room.leave(alice, "again")
    room.leave(bob, announce=False)
    assert carol.got[-1] == b"*** guest-1 has left (quit)\r\n"
    assert now(room.who()) == ["guest-3"]
    assert len(room) == 1


# --- the protocol against the IRoom seam ----------------------------------------------------


@implementer(IRoom)
class RecordingRoom:
    """An IRoom that records what the protocol asks of it: the seam a broker room fills."""

    def __init__(self):
        self.calls = []

    def join(self, member):
        member.name = "remote-7"
        self.calls.append(("join", member.name))
        return defer.succeed(member.name)

    def leave(self, member, reason="", announce=True):
        self.calls.append(("leave", reason, announce))
        return defer.succeed(None)

    def rename(self, member, new):
        self.calls.append(("rename", new))
        if new == "taken":
            return defer.succeed("someone has it")
        member.name = new
        return defer.succeed(None)

    def who(self):
        return defer.succeed(["remote-7", "elsewhere"])

    def count(self):
        return defer.succeed(2)

    def broadcast(self, sender, lines):
        self.calls.append(("broadcast", list(lines)))

    def announce(self, line):
        self.calls.append(("announce", line))

    def private(self, sender, recipient, line):
        self.calls.append(("private", recipient, line))
        return defer.succeed(recipient == "elsewhere")

    def history(self):
        return defer.succeed([b"old: message\r\n"])


def test_protocol_speaks_only_through_the_room_interface():
    room = RecordingRoom()
    assert verifyObject(IRoom, room)
    factory, _ = make_chat(room=room)
    proto, transport = join(factory)
    welcome = take(transport)
    assert "remote-7" in welcome[0]
    assert "old: message" in welcome
    proto.dataReceived(b"hi\r\nthere\r\n/NAME taken\r\n/nick neo\r\nagain\n")
    proto.dataReceived(b"/MSG elsewhere psst\n/msg ghost boo\n/me waves\n/who\n/quit\n")
    assert room.calls == [
        ("join", "remote-7"),
        ("broadcast", ["remote-7: hi", "remote-7: there"]),
        ("rename", "taken"),
        ("rename", "neo"),
        ("broadcast", ["neo: again"]),
        ("private", "elsewhere", "psst"),
        ("private", "ghost", "boo"),
        ("broadcast", ["* neo waves"]),
        ("leave", "quit", True),
    ]
    assert take(transport) == [
        "*** Cannot take the name 'taken': someone has it.",
        "[private to elsewhere] psst",
        "*** No one here is called ghost.",
        "*** 2 here:",
        "***   remote-7 elsewhere",
        "*** Goodbye, neo.",
    ]
    assert transport.disconnecting
    proto.connectionLost(None)
    assert room.calls[-1] == ("leave", "quit", True)


# --- the protocol with the real room: framing and text --------------------------------------


def two_people(limits=NO_LIMITS):
    """A room with two people in it, their welcome messages already read."""
    factory, clock = make_chat(limits=limits)
    alice, alice_t = join(factory)
    bob, bob_t = join(factory)
    take(alice_t), take(bob_t)
    return factory, clock, (alice, alice_t), (bob, bob_t)


@pytest.fixture
def pair():
    return two_people()


@pytest.mark.parametrize(
    "chunks",
    [
        [b"one\r\ntwo\r\n"],
        [b"one\r\x00two\r\x00"],
        [b"one\ntwo\n"],
        [b"one\rtwo\r"],
        [b"one\r", b"\ntwo\r", b"\n"],
        [b"one\r", b"\x00two\r", b"\x00"],
        [b"o", b"ne", b"\r", b"\n", b"t", b"wo\n"],
        [b"one\r\n", b"\n", b"\r\ntwo\n"],
    ],
)
def test_every_line_end_frames_lines_and_none_doubles(pair, chunks):
    _, _, (alice, _), (_, bob_t) = pair
    for chunk in chunks:
        alice.dataReceived(chunk)
    assert take(bob_t) == ["guest-1: one", "guest-1: two"]


def test_sender_does_not_get_its_own_line_back(pair):
    _, _, (alice, alice_t), (_, bob_t) = pair
    alice.dataReceived(b"hello\n")
    assert take(alice_t) == []
    assert take(bob_t) == ["guest-1: hello"]


def test_one_turn_of_talk_reaches_each_member_in_one_write(pair):
    factory, clock, (alice, alice_t), (bob, bob_t) = pair
    _carol, carol_t = join(factory)
    take(alice_t), take(bob_t), take(carol_t)
    writes = {bob_t: [], carol_t: []}
    for transport, log in writes.items():
        transport.write = log.append
    alice.dataReceived(b"a\nb\n")
    bob.dataReceived(b"c\n")
    assert writes[bob_t] == writes[carol_t] == [], "nothing is sent before the turn ends"
    clock.advance(0)
    assert writes[bob_t] == [b"guest-1: a\r\nguest-1: b\r\n"]
    assert writes[carol_t] == [b"guest-1: a\r\nguest-1: b\r\nguest-2: c\r\n"]
    alice.dataReceived(b"single\n")
    clock.advance(0)
    assert writes[bob_t][-1] is writes[carol_t][-1], "one message: one bytes object for all"


def test_a_member_whose_send_fails_stops_no_one_else(pair, logged):
    factory, clock, (alice, _), (_, bob_t) = pair
    _carol, carol_t = join(factory)
    take(bob_t), take(carol_t)

    def broken(data):
        raise OSError("send failed")

    bob_t.write = broken
    alice.dataReceived(b"still heard\n")
    clock.advance(0)
    assert take(carol_t) == ["guest-1: still heard"]
    assert any("sending to guest-2 failed" in text for _, text in logged)


def test_utf8_character_split_across_reads_survives(pair):
    _, _, (alice, _), (_, bob_t) = pair
    euro = "€".encode()
    alice.dataReceived(b"price " + euro[:1])
    alice.dataReceived(euro[1:2])
    alice.dataReceived(euro[2:] + b"5\r\n")
    assert take(bob_t) == ["guest-1: price €5"]


def test_invalid_utf8_is_replaced_not_fatal(pair):
    _, _, (alice, alice_t), (_, bob_t) = pair
    alice.dataReceived(b"bad \xc3\x28 \x80 bytes\n")
    assert take(bob_t) == ["guest-1: bad \ufffd( \ufffd bytes"]
    assert not alice_t.disconnecting


def test_control_characters_are_removed_but_tabs_kept(pair):
    _, _, (alice, _), (_, bob_t) = pair
    alice.dataReceived(b"\x1b[2Jclear\x07 me\tplease\x08\n")
    assert take(bob_t) == ["guest-1: [2Jclear me\tplease"]


def test_blank_lines_are_not_broadcast_and_double_slash_escapes(pair):
    _, _, (alice, _), (_, bob_t) = pair
    alice.dataReceived(b"\n   \n//etc/passwd is a path\n")
    assert take(bob_t) == ["guest-1: /etc/passwd is a path"]


# --- telnet ---------------------------------------------------------------------------------

IAC, DO, DONT, WILL, WONT, SB, SE, IP = 255, 253, 254, 251, 252, 250, 240, 244


def test_telnet_option_requests_are_refused_and_never_shown(pair):
    _, _, (alice, alice_t), (_, bob_t) = pair
    negotiation = bytes([IAC, DO, 1, IAC, WILL, 31, IAC, WONT, 3, IAC, DONT, 5])
    alice.dataReceived(negotiation + b"hi" + negotiation + b"\r\n")
    assert sent(alice_t) == bytes([IAC, WONT, 1, IAC, DONT, 31]) * 2
    assert take(bob_t) == ["guest-1: hi"]


def test_every_ctrl_c_timing_mark_is_answered(pair):
    """telnet discards all output after Ctrl-C until its DO TIMING-MARK is answered."""
    _, _, (alice, alice_t), _ = pair
    for _ in range(3):
        alice.dataReceived(bytes([IAC, IP, IAC, DO, 6]))
    assert sent(alice_t) == bytes([IAC, WONT, 6]) * 3


def test_telnet_subnegotiation_and_commands_are_dropped_even_split(pair):
    _, _, (alice, _), (_, bob_t) = pair
    data = (
        b"a"
        + bytes([IAC, SB, 31, 0, 80, 0, 24, IAC, SE])
        + b"b"
        + bytes([IAC, IP, IAC, 0xF6])
        + b"c"
        + bytes([IAC, SB, 24, 0])
        + b"\r\n still inside"
        + bytes([IAC, SE])
        + b"d\r\n"
    )
    for i in range(len(data)):
        alice.dataReceived(data[i : i + 1])
    assert take(bob_t) == ["guest-1: abcd"]


def test_iac_iac_is_data_shown_as_a_replacement_character(pair):
    _, _, (alice, _), (_, bob_t) = pair
    alice.dataReceived(bytes([IAC, IAC]) + b"x\n")
    assert take(bob_t) == ["guest-1: \ufffdx"]


@pytest.mark.parametrize(
    "garbage",
    [
        bytes([IAC]),
        bytes([IAC, DO]),
        bytes([IAC, SB]),
        bytes([IAC, SB, IAC]),
        bytes([IAC, SE, IAC, 0, IAC, 17]),
        bytes([IAC, DO, IAC, WILL, IAC]),
        bytes([IAC, 0xF0, IAC, 0xFE]) * 100,
    ],
)
def test_malformed_telnet_never_raises_and_the_connection_recovers(pair, garbage):
    _, _, (alice, alice_t), (_, bob_t) = pair
    alice.dataReceived(garbage)
    alice.dataReceived(bytes([IAC, SE]) + b"\r\nstill here\r\n")
    assert take(bob_t)[-1] == "guest-1: still here"
    assert not alice_t.disconnecting


# --- commands -------------------------------------------------------------------------------


def test_name_command_renames_announces_and_refuses_duplicates(pair):
    _, _, (alice, alice_t), (bob, bob_t) = pair
    alice.dataReceived(b"/name Alice\r\n")
    assert take(alice_t) == take(bob_t) == ["*** guest-1 is now known as Alice"]
    bob.dataReceived(b"/NICK alice\r\n")
    assert take(bob_t) == ["*** Cannot take the name 'alice': Alice is already taken."]
    bob.dataReceived(b"/Nick two words\r\n")
    assert "no spaces" in take(bob_t)[0]
    bob.dataReceived(b"/NAME\r\n")
    assert take(bob_t) == ["*** You are guest-2. To change it: /NAME newname"]
    alice.dataReceived(b"hello\n")
    assert take(bob_t) == ["Alice: hello"]


def test_who_lists_everyone_in_lines_of_ten(pair):
    factory, _, (alice, alice_t), _ = pair
    for _ in range(10):
        join(factory)
    take(alice_t)
    alice.dataReceived(b"/WHO\n")
    lines = take(alice_t)
    assert lines[0] == "*** 12 here:"
    names = " ".join(lines[1:]).replace("***", "").split()
    assert sorted(names) == sorted(f"guest-{i}" for i in range(1, 13))
    assert len(lines) == 3


def test_me_is_an_action_and_needs_text(pair):
    _, _, (alice, alice_t), (_, bob_t) = pair
    alice.dataReceived(b"/me waves\n/ME\n")
    assert take(bob_t) == ["* guest-1 waves"]
    assert take(alice_t) == ["*** Usage: /ME action, e.g. /ME waves"]


def test_msg_is_private_and_errors_go_to_the_sender_only(pair):
    factory, _, (alice, alice_t), (_, bob_t) = pair
    _carol, carol_t = join(factory)
    take(alice_t), take(bob_t), take(carol_t)
    alice.dataReceived(b"/msg GUEST-2 just you and me\n/msg nobody hi\n/msg guest-2\n")
    assert take(bob_t) == ["[private] guest-1: just you and me"]
    assert take(carol_t) == []
    assert take(alice_t) == [
        "[private to GUEST-2] just you and me",
        "*** No one here is called nobody.",
        "*** Usage: /MSG name text",
    ]


@pytest.mark.parametrize("command", [b"/EXIT", b"/quit", b"/Quit now"])
def test_exit_says_goodbye_closes_and_is_announced(pair, command):
    factory, _, (alice, alice_t), (_, bob_t) = pair
    alice.dataReceived(command + b"\r\nnot sent\r\n")
    assert take(alice_t) == ["*** Goodbye, guest-1."]
    assert alice_t.disconnecting
    assert take(bob_t) == ["*** guest-1 has left (quit)"]
    alice.connectionLost(None)
    assert now(factory.room.who()) == ["guest-2"]
    assert take(bob_t) == []


def test_unknown_command_is_an_error_to_the_sender_only(pair):
    _, _, (alice, alice_t), (_, bob_t) = pair
    alice.dataReceived(b"/dance\n")
    assert take(alice_t) == ["*** Unknown command /dance. /HELP lists the commands."]
    assert take(bob_t) == []


def test_help_lists_every_command(pair):
    _, _, (alice, alice_t), _ = pair
    alice.dataReceived(b"/help\n")
    text = "\n".join(take(alice_t))
    for command in ("/NAME", "/NICK", "/WHO", "/ME", "/MSG", "/HELP", "/EXIT", "/QUIT"):
        assert command in text


def test_welcome_and_history_greet_a_newcomer_and_others_see_the_arrival():
    factory, _ = make_chat(history=2)
    alice, alice_t = join(factory)
    assert take(alice_t) == [
        "*** Welcome to twistnet chat, guest-1! 1 here now."
        " /NAME yourname to pick a name, /HELP for commands."
    ]
    alice.dataReceived(b"one\ntwo\nthree\n")
    _, bob_t = join(factory)
    assert take(alice_t) == ["*** guest-2 has joined"]
    assert take(bob_t)[1:] == [
        "*** The last 2 messages:",
        "guest-1: two",
        "guest-1: three",
        "*** (end)",
    ]


def test_hang_up_leaves_the_room_and_is_announced(pair):
    factory, _, (alice, alice_t), (_, bob_t) = pair
    hang_up(alice, alice_t)
    assert take(bob_t) == ["*** guest-1 has left"]
    assert now(factory.room.who()) == ["guest-2"]
    assert len(factory.registry) == 1


# --- limits ---------------------------------------------------------------------------------


def test_overlong_line_is_refused_and_connection_kept():
    _, _, (alice, alice_t), (_, bob_t) = two_people(ChatLimits(max_line=10, rate=0, sendq=0))
    alice.dataReceived(b"0123456789\n01234567890\nok\n")
    assert take(bob_t) == ["guest-1: 0123456789", "guest-1: ok"]
    assert take(alice_t) == ["*** Line too long (over 10 bytes): not sent."]
    assert not alice_t.disconnecting


def test_overlong_line_arriving_in_pieces_is_refused_once_and_discarded():
    _, _, (alice, alice_t), (_, bob_t) = two_people(ChatLimits(max_line=10, rate=0, sendq=0))
    for _ in range(50):
        alice.dataReceived(b"x" * 7)
    assert len(alice._splitter._buffer) <= 10
    alice.dataReceived(b"xxx\r")
    alice.dataReceived(b"\nafter\n")
    assert take(alice_t) == ["*** Line too long (over 10 bytes): not sent."]
    assert take(bob_t) == ["guest-1: after"]


def test_flooder_is_warned_then_disconnected():
    _, _, (alice, alice_t), (_, bob_t) = two_people(ChatLimits(rate=2, burst=3, sendq=0))
    alice.dataReceived(b"1\n2\n3\n4\n5\n")
    assert take(bob_t) == ["guest-1: 1", "guest-1: 2", "guest-1: 3"]
    warning = take(alice_t)
    assert len(warning) == 1 and "sending too fast" in warning[0]
    assert not alice_t.disconnecting
    alice.dataReceived(b"x\n" * 3)
    assert alice_t.disconnecting
    assert take(alice_t) == ["*** Disconnected: still sending too fast after a warning."]
    alice.connectionLost(None)
    assert take(bob_t) == ["*** guest-1 has left (flooding)"]


def test_rate_refills_with_time_and_forgives_a_calm_client():
    _, clock, (alice, alice_t), (_, bob_t) = two_people(ChatLimits(rate=2, burst=3, sendq=0))
    alice.dataReceived(b"1\n2\n3\n4\n")
    assert "sending too fast" in take(alice_t)[0]
    clock.advance(1)
    alice.dataReceived(b"5\n6\n7\n")
    assert take(bob_t)[-2:] == ["guest-1: 5", "guest-1: 6"]
    clock.advance(10)
    alice.dataReceived(b"a\nb\nc\nd\n")
    assert "sending too fast" in take(alice_t)[0], "warned afresh after calming down"
    assert not alice_t.disconnecting


def test_rate_zero_turns_the_limit_off(pair):
    _, _, (alice, alice_t), (_, bob_t) = pair
    alice.dataReceived(b"x\n" * 1000)
    assert len(take(bob_t)) == 1000
    assert not alice_t.disconnecting


def test_non_reading_member_is_cut_off_at_sendq_and_logged_others_served(logged):
    factory, _ = make_chat(limits=ChatLimits(rate=0, sendq=300))
    alice, alice_t = join(factory)
    slow, slow_t = join(factory)
    _, bob_t = join(factory)
    slow.dataReceived(b"/nick slowpoke\n")
    take(alice_t), take(bob_t)
    for i in range(20):
        alice.dataReceived(b"message %02d of twenty-odd bytes\n" % i)
        take(bob_t)  # bob reads, slowpoke (whose StringTransport keeps everything) does not
    assert slow_t.disconnected
    assert len(sent(slow_t)) <= 300 + 200, "cut off near the cap, not far past it"
    slow.connectionLost(None)
    assert now(factory.room.who()) == ["guest-1", "guest-3"]
    assert take(bob_t) == ["*** slowpoke has left (not reading, send queue full)"]
    warnings = [text for level, text in logged if level == LogLevel.warn]
    assert any("disconnecting slowpoke" in text and "--sendq 300" in text for text in warnings)
    alice.dataReceived(b"still works\n")
    assert take(bob_t) == ["guest-1: still works"]


def test_server_bulk_output_never_trips_the_sendq_of_an_honest_client():
    factory, _ = make_chat(limits=ChatLimits(rate=0, sendq=200), history=20)
    talker, talker_t = join(factory)
    talker.dataReceived(b"".join(b"history line number %02d\n" % i for i in range(20)))
    for _ in range(30):
        join(factory)
        take(talker_t)
    _newcomer, newcomer_t = join(factory)
    assert len(sent(newcomer_t)) > 200, "welcome and history are bigger than the cap"
    talker.dataReceived(b"a fresh line\n")
    assert not newcomer_t.disconnected
    assert sent(newcomer_t).endswith(b"guest-1: a fresh line\r\n")
    take(newcomer_t)
    _newcomer.dataReceived(b"/who\n")
    assert len(sent(newcomer_t)) > 200
    take(talker_t)
    talker.dataReceived(b"another\n")
    assert not newcomer_t.disconnected
    assert sent(newcomer_t).endswith(b"guest-1: another\r\n")


def test_a_client_spamming_commands_without_reading_is_still_cut_off():
    factory, _ = make_chat(limits=ChatLimits(rate=0, sendq=2000))
    alice, alice_t = join(factory)
    for _ in range(100):
        alice.dataReceived(b"/help\n")
        sent(alice_t)
        if alice_t.disconnected:
            break
    assert alice_t.disconnected


class OpaqueTransport(StringTransport):
    """A transport whose buffer cannot be read: only producer pause/resume tell its state."""

    value = None  # hide StringTransport's buffer from the probe

    def sent(self) -> bytes:
        return self.io.getvalue()


def test_sendq_falls_back_to_producer_pauses_on_opaque_transports():
    factory, clock = make_chat(limits=ChatLimits(rate=0, sendq=100))
    talker, talker_t = join(factory)
    slow, slow_t = join(factory, OpaqueTransport())
    counter = slow_t.producer
    assert isinstance(counter, PauseCounter)
    talker.dataReceived(b"x" * 60 + b"\n")
    clock.advance(0)
    assert not slow_t.disconnecting, "unpaused: the transport copes"
    counter.pauseProducing()  # the transport's buffer is full
    talker.dataReceived(b"y" * 60 + b"\n")
    clock.advance(0)
    assert not slow_t.disconnecting
    counter.resumeProducing()  # drained
    counter.pauseProducing()
    for line in (b"1" * 60, b"2" * 60):
        talker.dataReceived(line + b"\n")
        clock.advance(0)
    assert slow_t.disconnecting, "70 + 70 bytes written while paused pass --sendq 100"
    assert slow_t.producer is None, "unregistered, so closing does not wait for it"
    assert b"2" * 60 not in slow_t.sent()
    slow.connectionLost(None)
    assert now(factory.room.who()) == ["guest-1"]
    take(talker_t)


def test_room_full_is_told_and_closed():
    factory, _ = make_chat(max_clients=2)
    join(factory), join(factory)
    third, third_t = join(factory)
    assert sent(third_t) == b"*** The chat room is full, try again later.\r\n"
    assert third_t.disconnecting
    third.dataReceived(b"/nick sneaky\n")
    third.connectionLost(None)
    assert len(factory.room) == 2
    assert now(factory.room.who()) == ["guest-1", "guest-2"]


def test_idle_timeout_counts_only_complete_lines():
    factory, clock = make_chat(idle_timeout=10)
    talker, talker_t = join(factory)
    trickler, trickler_t = join(factory)
    reader, reader_t = join(factory)
    for _ in range(9):
        clock.advance(1)
        trickler.dataReceived(b"x")  # a line it never finishes
        talker.dataReceived(b"hi\n")  # the reader receives, but sends nothing
    clock.advance(1.5)
    assert trickler_t.disconnecting
    assert reader_t.disconnecting
    assert not talker_t.disconnecting
    assert sent(trickler_t).endswith(ChatProtocol.idle_message)
    trickler.connectionLost(None)
    reader.connectionLost(None)
    assert now(factory.room.who()) == ["guest-1"]
    assert "has left (idle timeout)" in take(talker_t)[-1]
    talker.connectionLost(None)
    assert clock.getDelayedCalls() == []


# --- options, makeService, shutdown ---------------------------------------------------------


def parse(*argv):
    options = chat.Options()
    options.parseOptions(list(argv))
    return options


def test_options_defaults():
    options = parse()
    assert options.endpoint_descriptions() == ["tcp:12345:backlog=511"]
    assert options["max-connections"] == 1000
    assert options["idle-timeout"] == 0.0
    assert (options["history"], options["max-line"], options["rate"]) == (20, 4096, 10.0)
    assert (options["burst"], options["sendq"]) == (20, 1048576)


def test_each_option_is_parsed():
    options = parse(
        "--port=2000",
        "--max-clients=7",
        "--idle-timeout=30",
        "--history=5",
        "--max-line=100",
        "--rate=0.5",
        "--burst=3",
        "--sendq=0",
    )
    assert options.endpoint_descriptions() == ["tcp:2000:backlog=511"]
    assert options["max-connections"] == 7
    assert options["idle-timeout"] == 30.0
    assert (options["history"], options["max-line"], options["rate"]) == (5, 100, 0.5)
    assert (options["burst"], options["sendq"]) == (3, 0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-line", "0"],
        ["--max-line", "big"],
        ["--rate", "-1"],
        ["--rate", "inf"],
        ["--burst", "0"],
        ["--sendq", "-5"],
        ["--history", "x"],
        ["--max-clients", "-1"],
        ["--port", "99999"],
    ],
)
def test_bad_options_are_usage_errors(argv):
    with pytest.raises(usage.UsageError):
        parse(*argv)


def test_make_service_listens_with_the_limits_given():
    reactor = MemoryReactorClock()
    options = parse("--listen", "tcp:7100:interface=127.0.0.1", "--max-line", "99", "--rate=0")
    service = chat.makeService(options, reactor=reactor)
    service.privilegedStartService()
    service.startService()
    (port, factory, _, interface) = reactor.tcpServers[0]
    assert (port, interface) == (7100, "127.0.0.1")
    assert factory.limits == ChatLimits(max_line=99, rate=0.0, burst=20, sendq=1048576)
    assert defer.maybeDeferred(service.stopService).called


def test_shutdown_tells_everyone_after_what_was_said_and_announces_no_departures():
    factory, clock = make_chat(limits=NO_LIMITS)
    people = [join(factory) for _ in range(3)]
    for _, transport in people:
        take(transport)
    people[0][0].dataReceived(b"last words\n")
    closer = ChatCloser(factory)
    closer.startService()
    stopped = closer.stopService()
    expected = [b"", b"guest-1: last words\r\n", b"guest-1: last words\r\n"]
    for (proto, transport), before in zip(people, expected, strict=True):
        assert transport.value() == before + SHUTDOWN_NOTICE
        assert transport.disconnecting
        proto.connectionLost(None)
        assert sent(transport) == before + SHUTDOWN_NOTICE, "no 'has left' during shutdown"
    assert stopped.called
    assert len(factory.room) == 0
    assert clock.getDelayedCalls() == []


# --- end to end: twistd as a child process --------------------------------------------------


def start_chat(twistd, *args: str):
    server = twistd("twistnet-chat", "--listen", "tcp:0:interface=127.0.0.1", *args)
    server.tcp_port = server.port()
    return server


TELNET_HELLO = bytes([IAC, DO, 1, IAC, WILL, 31, IAC, SB, 31, 0, 80, 0, 24, IAC, SE])


def test_telnet_and_nc_users_talk_rename_and_whisper(twistd):
    server = start_chat(twistd)
    with ChatClient(server.tcp_port, eol=b"\r\n") as telnet, ChatClient(server.tcp_port) as nc:
        telnet.wait_for(f"{nc.name} has joined".encode())
        telnet.sock.sendall(TELNET_HELLO)
        telnet.wait_for(bytes([IAC, WONT, 1, IAC, DONT, 31]))
        telnet.rename("tel")
        nc.rename("Nc")
        telnet.send("/name NC")
        assert b"NC': Nc is already taken" in telnet.wait_for(b"Cannot take the name")
        telnet.send(b"hello from telnet" + bytes([IAC, IP]) + b" \xe2\x82\xac")
        assert nc.wait_for(b"tel:") == "tel: hello from telnet €".encode()
        nc.send("hi telnet, this is nc")
        assert telnet.wait_for(b"Nc:") == b"Nc: hi telnet, this is nc"
        nc.send("/MSG TEL just between us", "/msg ghost hello?")
        assert nc.wait_for(b"No one here") == b"*** No one here is called ghost."
        assert telnet.wait_for(b"[private]") == b"[private] Nc: just between us"
        nc.send("/who")
        assert nc.wait_for(b"***   ") == b"***   Nc tel"
        nc.send("/quit")
        assert nc.wait_for(b"Goodbye") == b"*** Goodbye, Nc."
        assert recv_until_closed(nc.sock) == b""
        assert telnet.wait_for(b"has left") == b"*** Nc has left (quit)"
    assert "Traceback" not in server.output


def test_200kb_line_is_refused_and_the_connection_kept(twistd):
    server = start_chat(twistd)
    with ChatClient(server.tcp_port) as sender, ChatClient(server.tcp_port) as reader:
        sender.send(b"A" * 200_000, b"short one")
        assert sender.wait_for(b"Line too long") == (
            b"*** Line too long (over 4096 bytes): not sent."
        )
        assert reader.wait_for(b"short one") == f"{sender.name}: short one".encode()
        assert b"AAAA" not in reader.received


def test_invalid_utf8_is_replaced_end_to_end(twistd):
    server = start_chat(twistd)
    with ChatClient(server.tcp_port) as sender, ChatClient(server.tcp_port) as reader:
        sender.send(b"caf\xe9 \xfe\x80 na\xc3\xafve")
        line = reader.wait_for(b"caf")
        assert line.decode("utf-8") == f"{sender.name}: caf\ufffd \ufffd\ufffd naïve"


def test_non_reading_client_is_cut_off_and_server_memory_stays_bounded(twistd):
    """A member that never reads is cut off at the default 1 MiB --sendq; RSS stays flat."""
    server = start_chat(twistd, "--rate", "0")
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(("127.0.0.1", server.tcp_port))
    with hog, ChatClient(server.tcp_port) as talker:
        rss_before = server.rss_kib()
        line = b"x" * 4000
        sent = 0
        # Bounded: 20 MB at most, far more than kernel buffers plus the cap.
        while sent < 5000 and "over --sendq" not in server.output:
            talker.send(*[line] * 50)
            sent += 50
        cut = server.wait_for_line(
            r"disconnecting guest-1 \(127\.0\.0\.1:\d+\): (?P<unsent>\d+) bytes unsent"
        )
        growth_kib = peak_rss_kib(server) - rss_before
        assert talker.wait_for(b"guest-1 has left") == (
            b"*** guest-1 has left (not reading, send queue full)"
        )
    print(
        f"non-reader cut off after {sent} lines of 4000 B with {cut.group('unsent')} B unsent;"
        f" peak RSS growth {growth_kib} KiB"
    )
    assert growth_kib < 8 * 1024, f"server grew {growth_kib} KiB for a non-reading client"
    assert server.terminate() == 0


def test_sigterm_tells_everyone_and_exits_zero(twistd):
    server = start_chat(twistd)
    with ChatClient(server.tcp_port, eol=b"\r\n") as one, ChatClient(server.tcp_port) as two:
        two.send("/who")
        two.wait_for(b"***   ")
        assert server.terminate() == 0
        for client in (one, two):
            rest = client.received + recv_until_closed(client.sock)
            assert b"*** The server is shutting down. Goodbye.\r\n" in rest
            assert b"has left" not in rest
    assert "received SIGTERM" in server.output
    assert "Traceback" not in server.output


def test_room_full_end_to_end(twistd):
    server = start_chat(twistd, "--max-clients", "1")
    with ChatClient(server.tcp_port), connect(server.tcp_port) as second:
        assert recv_until_closed(second) == b"*** The chat room is full, try again later.\r\n"
    server.wait_for_line(r"refused at --max-clients 1: 127\.0\.0\.1:\d+")


# --- a room that answers later, as one behind a broker does ---------------------------------


class SlowRoom(Room):
    """The in-memory room, but join and rename answer only when the test says so."""

    def __init__(self):
        super().__init__()
        self.unanswered: list[tuple[defer.Deferred, object]] = []

    def _later(self, answer):
        later = defer.Deferred()
        self.unanswered.append((later, now(answer)))
        return later

    def join(self, member):
        return self._later(super().join(member))

    def rename(self, member, new):
        return self._later(super().rename(member, new))

    def answer_all(self):
        """Answer what was asked so far (not what those answers lead to)."""
        asked, self.unanswered = self.unanswered, []
        for later, result in asked:
            later.callback(result)


def test_lines_sent_before_the_join_completed_wait_for_it_in_order():
    room = SlowRoom()
    factory, _ = make_chat(room=room)
    _, bob_t = join(factory)
    room.answer_all()
    take(bob_t)
    alice, alice_t = join(factory)
    alice.dataReceived(b"first\n/NAME alice\nsecond\n")
    assert take(bob_t) == ["*** guest-2 has joined"]
    assert take(alice_t) == [], "nothing before the welcome"
    assert alice_t.producerState == "paused", "reading waits while lines wait"
    room.answer_all()  # the join; then "second" waits for the rename's answer
    assert take(bob_t) == ["guest-2: first", "*** guest-2 is now known as alice"]
    room.answer_all()
    assert take(bob_t) == ["alice: second"]
    assert alice_t.producerState == "producing"
    welcome = take(alice_t)
    assert welcome[0].startswith("*** Welcome to twistnet chat, guest-2! 2 here now.")


def test_output_arriving_before_the_welcome_follows_it():
    room = SlowRoom()
    factory, _ = make_chat(room=room)
    bob, _ = join(factory)
    room.answer_all()
    _, alice_t = join(factory)
    bob.dataReceived(b"early\n")
    room.answer_all()
    lines = take(alice_t)
    assert lines[0].startswith("*** Welcome to twistnet chat, guest-2!")
    assert lines[-1] == "guest-1: early"


def test_a_client_gone_before_its_join_completed_leaves_no_name():
    room = SlowRoom()
    factory, _ = make_chat(room=room)
    alice, alice_t = join(factory)
    hang_up(alice, alice_t)
    room.answer_all()
    assert now(room.who()) == []
    assert alice_t.value() == b""


def test_full_room_evicts_the_longest_silent_member_who_leaves_at_once_with_a_reason():
    factory, clock = make_chat(max_clients=2)
    room = factory.room
    silent, silent_t = join(factory)
    talker, talker_t = join(factory)
    talker.dataReceived(b"hello\n")
    clock.advance(2)
    newcomer, _ = join(factory)
    assert isinstance(newcomer, ChatProtocol)
    # Gone from the room before its (unread) goodbye is flushed: the head count holds.
    assert silent not in room.members and len(room.members) == 2
    assert silent_t.disconnecting
    assert b"closing the connection that has waited longest" in sent(silent_t)
    assert talker in room.members and not talker_t.disconnecting


def test_a_members_lines_leave_without_nagle_on_tcp():
    from twisted.internet.interfaces import ITCPTransport

    @implementer(ITCPTransport)
    class TCPTransport(StringTransport):
        no_delay = False

        def setTcpNoDelay(self, enabled):
            self.no_delay = enabled

    factory, _ = make_chat()
    _, transport = join(factory, TCPTransport())
    assert transport.no_delay
