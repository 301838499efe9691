"""ServerProtocol as a pure state machine: bytes in, events and data_to_send out."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatwire.commands import HELP, Who
from chatwire.errors import LocalProtocolError
from chatwire.lines import MAX_LINE_BYTES, strip_controls
from chatwire.names import name_key, validate_name
from gateway.protocol import (
    CommandRequested,
    Event,
    MessageReceived,
    NameRequested,
    PeerClosed,
    QuitRequested,
    ServerProtocol,
    State,
)

PROMPT_LINE = b"* Choose a name:\n"


# --- helpers ------------------------------------------------------------------------------


def fresh() -> ServerProtocol:
    """A new connection whose opening prompt has already been read."""
    proto = ServerProtocol()
    assert proto.data_to_send() == PROMPT_LINE
    return proto


def send(proto: ServerProtocol, data: bytes) -> list[Event]:
    proto.receive_data(data)
    return proto.events_received()


def chatting(name: str = "alice") -> ServerProtocol:
    """A connection whose name was requested and accepted, with all output read."""
    proto = fresh()
    assert send(proto, name.encode() + b"\n") == [NameRequested(name, name_key(name))]
    proto.accept_name(1)
    proto.data_to_send()
    assert proto.state is State.CHATTING
    return proto


def out_lines(proto: ServerProtocol) -> list[str]:
    return proto.data_to_send().decode("utf-8").splitlines()


# --- opening and naming -------------------------------------------------------------------


def test_initial_prompt() -> None:
    """A new connection is awaiting a name and has the prompt line queued, once."""
    proto = ServerProtocol()
    assert proto.state is State.AWAITING_NAME
    assert proto.data_to_send() == b"* Choose a name:\n"
    assert proto.data_to_send() == b""
    assert proto.name is None


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"alice\n", "alice"),
        (b"  Alice \r\n", "Alice"),
        ("José\n".encode(), "José"),
        ("Jose\u0301\n".encode(), "José"),
        ("मोहन\r\n".encode(), "मोहन"),
    ],
)
def test_valid_name_requests_claim(data: bytes, name: str) -> None:
    """A valid name gives NameRequested(name, key), state CLAIMING and no output yet."""
    proto = fresh()
    assert send(proto, data) == [NameRequested(name, name_key(name))]
    assert proto.state is State.CLAIMING
    assert proto.data_to_send() == b""
    assert proto.name is None


def test_name_key_in_event_is_folded() -> None:
    """The key in NameRequested is the folded identity, not the display form."""
    assert send(fresh(), b"ALICE\n") == [NameRequested("ALICE", "alice")]


def test_lines_held_while_claiming_until_accept() -> None:
    """Lines sent during CLAIMING give no events until accept_name, then come out in order."""
    proto = fresh()
    assert send(proto, b"alice\nhello\n/who\n") == [NameRequested("alice", "alice")]
    assert proto.events_received() == []
    assert send(proto, b"world\n") == []
    assert proto.data_to_send() == b""

    proto.accept_name(3)
    assert proto.state is State.CHATTING
    assert proto.name == "alice"
    welcome = out_lines(proto)
    assert len(welcome) == 1
    assert welcome[0].startswith("* Welcome, alice! 3 users online.")
    assert proto.events_received() == [
        MessageReceived("hello"),
        CommandRequested(Who()),
        MessageReceived("world"),
    ]


def test_welcome_counts_one_user() -> None:
    """The welcome line says '1 user' when the new user is alone."""
    proto = fresh()
    send(proto, b"alice\n")
    proto.accept_name(1)
    assert out_lines(proto)[0].startswith("* Welcome, alice! 1 user online.")


def test_reject_name_reports_and_prompts_again() -> None:
    """reject_name(reason) queues '! reason' and the prompt, and the user may try again."""
    proto = fresh()
    send(proto, b"alice\nhello\n")
    proto.reject_name("alice is taken")
    assert proto.state is State.AWAITING_NAME
    assert proto.name is None
    assert proto.data_to_send() == b"! alice is taken\n" + PROMPT_LINE
    # The held line is now read as the next name attempt.
    assert proto.events_received() == [NameRequested("hello", "hello")]
    proto.accept_name(2)
    assert proto.name == "hello"


@pytest.mark.parametrize(
    "data",
    [
        b"john smith\n",
        b"a*b\n",
        b"bob:\n",
        b"hi!\n",
        b"@bob\n",
        "bob😀\n".encode(),
        b"b\x1bob\n",
        b"\n",
        b"   \r\n",
        b"a" * 33 + b"\n",
        b"\xff\xfe\n",
    ],
)
def test_invalid_name_answered_without_event(data: bytes) -> None:
    """An invalid name gives a '! ' line and a new prompt, no event, and state unchanged."""
    proto = fresh()
    assert send(proto, data) == []
    lines = out_lines(proto)
    assert len(lines) == 2
    assert lines[0].startswith("! ")
    assert lines[1] == "* Choose a name:"
    assert proto.state is State.AWAITING_NAME


def test_valid_name_after_invalid_one() -> None:
    """After an invalid name the next line is still read as a name."""
    proto = fresh()
    assert send(proto, b"bad name\nbob\n") == [NameRequested("bob", "bob")]
    assert proto.state is State.CLAIMING


# --- quitting -----------------------------------------------------------------------------

QUITS = [b"sair\n", b"SAIR\n", b" /quit \n", b"/QUIT\r\n", b"Sair\r\n"]


@pytest.mark.parametrize("data", QUITS)
def test_quit_while_chatting(data: bytes) -> None:
    """sair or /quit (any case, any surrounding space) gives QuitRequested and a goodbye."""
    proto = chatting("alice")
    assert send(proto, data) == [QuitRequested()]
    assert proto.state is State.CLOSED
    assert out_lines(proto) == ["* Goodbye, alice!"]


@pytest.mark.parametrize("data", QUITS)
def test_quit_before_a_name(data: bytes) -> None:
    """sair or /quit also works while awaiting a name, with a nameless goodbye."""
    proto = fresh()
    assert send(proto, data) == [QuitRequested()]
    assert proto.state is State.CLOSED
    lines = out_lines(proto)
    assert lines == ["* Goodbye!"]


def test_nothing_is_read_after_quit() -> None:
    """Lines after the quit, in the same chunk or later, and EOF give no events."""
    proto = chatting()
    assert send(proto, b"sair\nhello\n/who\n") == [QuitRequested()]
    proto.data_to_send()
    assert send(proto, b"more\n") == []
    proto.receive_eof()
    assert proto.events_received() == []
    assert proto.data_to_send() == b""


# --- chatting -----------------------------------------------------------------------------


def test_chat_line_becomes_message() -> None:
    """A chat line gives MessageReceived with its text, and the protocol itself says nothing."""
    proto = chatting()
    assert send(proto, b"hello world\r\n") == [MessageReceived("hello world")]
    assert proto.data_to_send() == b""


def test_message_keeps_inner_and_leading_spacing() -> None:
    """Spaces and tabs inside a message are kept as typed."""
    proto = chatting()
    assert send(proto, b"  a\tb  \n") == [MessageReceived("  a\tb  ")]


def test_message_control_characters_removed() -> None:
    """ESC, BEL, DEL, C1 controls and NUL are removed from messages; TAB stays."""
    proto = chatting()
    data = b"\x1b[2Jhi\x07 th\x00ere\x7f\xc2\x9b\tok\n"
    assert send(proto, data) == [MessageReceived("[2Jhi there\tok")]


@pytest.mark.parametrize("data", [b"\n", b"\r\n", b"   \n", b"\t \r\n", b"\x1b\x07\n", b" \x00 \n"])
def test_empty_and_blank_lines_ignored(data: bytes) -> None:
    """Empty, whitespace-only and control-only lines give no event and no output."""
    proto = chatting()
    assert send(proto, data) == []
    assert proto.data_to_send() == b""
    assert proto.state is State.CHATTING


@pytest.mark.parametrize("data", [b"/who\n", b"/WHO\r\n", b"  /who  \n", b"/who everyone\n"])
def test_who_command(data: bytes) -> None:
    """/who (any case, arguments ignored) gives WhoRequested and no output of its own."""
    proto = chatting()
    assert send(proto, data) == [CommandRequested(Who())]
    assert proto.data_to_send() == b""


def test_help_answered_by_the_protocol() -> None:
    """/help gives no event; the protocol answers with '* ' lines listing the commands."""
    proto = chatting()
    assert send(proto, b"/help\n") == []
    lines = out_lines(proto)
    assert lines == [f"* {text}" for text in HELP]
    assert all(line.startswith("* ") for line in lines)
    assert any("/who" in line for line in lines)


@pytest.mark.parametrize("data", [b"/foo\n", b"/foo bar baz\n", b"/\n", b"/wh\n"])
def test_unknown_command_is_an_error(data: bytes) -> None:
    """An unknown /command gives one '! ' line naming it, and no event."""
    proto = chatting()
    assert send(proto, data) == []
    lines = out_lines(proto)
    assert len(lines) == 1
    assert lines[0].startswith("! ")
    assert data.split()[0].decode() in lines[0]
    assert proto.state is State.CHATTING


def test_unknown_command_echo_is_sanitised() -> None:
    """The unknown command is echoed without control characters and cut short."""
    proto = chatting()
    assert send(proto, b"/fo\x1b[2Jo" + b"x" * 200 + b"\n") == []
    [line] = out_lines(proto)
    assert "\x1b" not in line
    assert strip_controls(line) == line
    assert len(line) < 200


@pytest.mark.parametrize(
    ("data", "text"),
    [(b"//text\n", "/text"), (b"//who\n", "/who"), (b"  //x y\n", "/x y"), (b"//\n", "/")],
)
def test_double_slash_sends_a_message_starting_with_slash(data: bytes, text: str) -> None:
    """'//text' is not a command: it sends the message '/text'."""
    proto = chatting()
    assert send(proto, data) == [MessageReceived(text)]
    assert proto.data_to_send() == b""


# --- over-long lines ----------------------------------------------------------------------

TOO_LONG_LINE = b"a" * (MAX_LINE_BYTES + 1) + b"\n"


def test_long_line_while_naming_then_prompt() -> None:
    """An over-long name line gives a '! ' line and a new prompt; naming still works after."""
    proto = fresh()
    assert send(proto, TOO_LONG_LINE) == []
    lines = out_lines(proto)
    assert len(lines) == 2
    assert lines[0].startswith("! ")
    assert lines[1] == "* Choose a name:"
    assert send(proto, b"alice\n") == [NameRequested("alice", "alice")]


def test_long_line_while_chatting_keeps_connection() -> None:
    """An over-long chat line gives one '! ' line, no event, and the next line still works."""
    proto = chatting()
    assert send(proto, TOO_LONG_LINE + b"hi\n") == [MessageReceived("hi")]
    lines = out_lines(proto)
    assert len(lines) == 1
    assert lines[0].startswith("! ")
    assert proto.state is State.CHATTING


def test_a_line_refused_by_the_transport_is_answered_like_a_long_one() -> None:
    """refuse_line (a WebSocket frame with a line break inside): a '! ' line, the prompt
    again while a name is awaited, no event and no state change; nothing once closed."""
    proto = fresh()
    proto.refuse_line("one line per frame")
    assert out_lines(proto) == ["! one line per frame", "* Choose a name:"]
    assert proto.state is State.AWAITING_NAME
    proto = chatting()
    proto.refuse_line("one line per frame")
    assert out_lines(proto) == ["! one line per frame"]
    assert proto.state is State.CHATTING
    proto.close()
    proto.refuse_line("one line per frame")
    assert proto.data_to_send() == b""


def test_huge_line_in_pieces_while_chatting() -> None:
    """A huge line arriving in chunks gives a single '! ' line, then chat continues."""
    proto = chatting()
    events: list[Event] = []
    for _ in range(5):
        events += send(proto, b"b" * 3000)
    events += send(proto, b"\nhi\n")
    assert events == [MessageReceived("hi")]
    lines = out_lines(proto)
    assert len(lines) == 1
    assert lines[0].startswith("! ")


def test_line_of_exactly_the_limit_is_a_message() -> None:
    """A chat line of exactly MAX_LINE_BYTES bytes is relayed whole."""
    proto = chatting()
    text = "c" * MAX_LINE_BYTES
    assert send(proto, text.encode() + b"\r\n") == [MessageReceived(text)]


# --- end of stream ------------------------------------------------------------------------


def test_eof_after_lines() -> None:
    """At EOF, lines already sent give their events first, then PeerClosed, once."""
    proto = chatting()
    proto.receive_data(b"one\n/who\ntwo\n")
    proto.receive_eof()
    assert proto.events_received() == [
        MessageReceived("one"),
        CommandRequested(Who()),
        MessageReceived("two"),
        PeerClosed(),
    ]
    assert proto.state is State.CLOSED
    assert proto.events_received() == []


def test_unterminated_last_line_before_eof() -> None:
    """A last line without LF is still handled at EOF."""
    proto = chatting()
    proto.receive_data(b"one\ntwo")
    assert proto.events_received() == [MessageReceived("one")]
    proto.receive_eof()
    assert proto.events_received() == [MessageReceived("two"), PeerClosed()]


def test_unterminated_quit_before_eof() -> None:
    """An unterminated 'sair' at EOF is a quit, not a plain close."""
    proto = chatting()
    proto.receive_data(b"sair")
    proto.receive_eof()
    assert proto.events_received() == [QuitRequested()]
    assert proto.state is State.CLOSED


def test_eof_while_awaiting_name() -> None:
    """EOF before any name gives PeerClosed and closes."""
    proto = fresh()
    proto.receive_eof()
    assert proto.events_received() == [PeerClosed()]
    assert proto.state is State.CLOSED


def test_unterminated_name_before_eof() -> None:
    """A name without LF before EOF is still claimed; PeerClosed follows the decision."""
    proto = fresh()
    proto.receive_data(b"alice")
    proto.receive_eof()
    assert proto.events_received() == [NameRequested("alice", "alice")]
    proto.accept_name(1)
    assert proto.events_received() == [PeerClosed()]


def test_eof_during_claiming_waits_for_accept() -> None:
    """EOF during CLAIMING gives nothing until accept_name, then held lines and PeerClosed."""
    proto = fresh()
    proto.receive_data(b"alice\nhi\n")
    assert proto.events_received() == [NameRequested("alice", "alice")]
    proto.receive_eof()
    assert proto.events_received() == []
    assert proto.state is State.CLAIMING
    proto.accept_name(1)
    assert proto.events_received() == [MessageReceived("hi"), PeerClosed()]
    assert proto.state is State.CLOSED


def test_eof_during_claiming_then_reject() -> None:
    """EOF during CLAIMING followed by reject_name closes with PeerClosed."""
    proto = fresh()
    proto.receive_data(b"alice\n")
    proto.events_received()
    proto.receive_eof()
    proto.reject_name("taken")
    assert proto.events_received() == [PeerClosed()]


def test_data_after_eof_is_ignored() -> None:
    """Bytes arriving after EOF are not parsed."""
    proto = chatting()
    proto.receive_eof()
    proto.receive_data(b"late\n")
    assert proto.events_received() == [PeerClosed()]


# --- misuse by the gateway ----------------------------------------------------------------


def test_accept_name_in_wrong_state_raises() -> None:
    """accept_name outside CLAIMING raises LocalProtocolError and changes nothing."""
    proto = fresh()
    with pytest.raises(LocalProtocolError):
        proto.accept_name(1)
    assert proto.state is State.AWAITING_NAME

    proto = chatting()
    with pytest.raises(LocalProtocolError):
        proto.accept_name(1)
    assert proto.state is State.CHATTING
    assert proto.data_to_send() == b""


def test_reject_name_in_wrong_state_raises() -> None:
    """reject_name outside CLAIMING raises LocalProtocolError."""
    proto = chatting()
    with pytest.raises(LocalProtocolError):
        proto.reject_name("no")
    assert proto.state is State.CHATTING


def test_accept_name_after_close_raises() -> None:
    """Once CLOSED, accept_name raises LocalProtocolError."""
    proto = fresh()
    send(proto, b"alice\n")
    proto.close()
    with pytest.raises(LocalProtocolError):
        proto.accept_name(1)
    assert proto.state is State.CLOSED


def test_close_is_idempotent() -> None:
    """close(notice) queues the notice once; a second close does nothing."""
    proto = chatting()
    proto.close("shutting down")
    proto.close("again")
    assert proto.state is State.CLOSED
    assert proto.data_to_send() == b"* shutting down\n"


# --- output is always clean UTF-8 ---------------------------------------------------------

NASTY = [
    b"\xff\xfe\xfd\n",
    b"\xc3(\n",
    b"/\xff\xfe\n",
    b"/f\xc3\n",
    b"n\xe5\xb1\n",
    b"\xed\xa0\x80\n",  # an encoded surrogate
    b"\xf4\x90\x80\x80\n",  # beyond U+10FFFF
    b"\x1b\xc2\x9b\xff\n",
    b"\xff" * (MAX_LINE_BYTES + 10) + b"\n",
]


@pytest.mark.parametrize("data", NASTY)
def test_output_is_valid_utf8_while_naming(data: bytes) -> None:
    """Whatever bytes arrive as a name, the answer is valid UTF-8 without control characters."""
    proto = fresh()
    send(proto, data)
    text = proto.data_to_send().decode("utf-8")
    assert text
    assert all(strip_controls(line) == line for line in text.splitlines())


@pytest.mark.parametrize("data", NASTY)
def test_output_is_valid_utf8_while_chatting(data: bytes) -> None:
    """Whatever bytes arrive while chatting, all output is valid UTF-8 and events are clean."""
    proto = chatting()
    events = send(proto, data)
    text = proto.data_to_send().decode("utf-8")
    assert all(strip_controls(line) == line for line in text.splitlines())
    for event in events:
        assert isinstance(event, MessageReceived)
        assert event.text.encode("utf-8")
        assert strip_controls(event.text) == event.text


# --- property: any split is the same as the whole ----------------------------------------

_FRAGMENTS = st.one_of(
    st.sampled_from(
        [
            b"\n",
            b"\r",
            b"\r\n",
            b"\xff",
            b"\xc3",
            b"\xa9",
            b"/",
            b"//",
            b" ",
            b"\t",
            b"\x1b",
            b"sair",
            b"SAIR",
            b"/quit",
            b"/who",
            b"/help",
            b"/foo",
            b"alice",
            b"Bob",
            "José".encode(),
            b"a b",
            b"*",
            b"x" * (MAX_LINE_BYTES - 2),
            b"y" * (MAX_LINE_BYTES + 1),
        ]
    ),
    st.binary(max_size=6),
)


_LINES = st.one_of(
    # Whole lines that mean something, so naming, chatting and commands are all reached.
    st.sampled_from(
        [b"alice\n", b"Bob\r\n", b"hello\n", b"/who\n", b"/help\n", b"//x\n", b"/foo\n", b"sair\n"]
    ),
    # Lines built from fragments, with any ending or none.
    st.builds(
        lambda parts, end: b"".join(parts) + end,
        st.lists(_FRAGMENTS, max_size=4),
        st.sampled_from([b"\n", b"\r\n", b""]),
    ),
)


@st.composite
def bytes_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = b"".join(draw(st.lists(_LINES, max_size=12)))
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    return data, cuts


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


def run(
    pieces: Iterable[bytes], *, eof: bool, reject_first: bool = False
) -> tuple[list[Event], bytes, State]:
    """Drive a protocol like the gateway would, answering every NameRequested at once.

    With ``reject_first`` the first claim is refused and later ones accepted, so both the
    reject and the chat paths are exercised.
    """
    proto = ServerProtocol()
    events: list[Event] = []
    output = bytearray(proto.data_to_send())
    claims = 0

    def pump() -> None:
        nonlocal claims
        while True:
            batch = proto.events_received()
            events.extend(batch)
            output.extend(proto.data_to_send())
            if not batch or not isinstance(batch[-1], NameRequested):
                return
            claims += 1
            if reject_first and claims == 1:
                proto.reject_name("that name is taken")
            else:
                proto.accept_name(claims)

    for piece in pieces:
        proto.receive_data(piece)
        pump()
    if eof:
        proto.receive_eof()
        pump()
    output.extend(proto.data_to_send())
    return events, bytes(output), proto.state


@settings(max_examples=200, deadline=None)
@given(case=bytes_and_cuts(), eof=st.booleans(), reject_first=st.booleans())
def test_any_split_gives_same_events_and_output(
    case: tuple[bytes, list[int]], eof: bool, reject_first: bool
) -> None:
    """Feeding bytes in arbitrary pieces gives the same events, output and state as whole."""
    data, cuts = case
    expected = run([data], eof=eof, reject_first=reject_first)
    assert run(split_at(data, cuts), eof=eof, reject_first=reject_first) == expected

    events, output, state = expected
    text = output.decode("utf-8")
    assert text.endswith("\n")
    for line in text.splitlines():
        assert line.startswith(("* ", "! "))
        assert strip_controls(line) == line
    for event in events:
        if isinstance(event, MessageReceived):
            assert event.text.strip()
            assert strip_controls(event.text) == event.text
        elif isinstance(event, NameRequested):
            assert validate_name(event.name) == event.name
            assert event.key == name_key(event.name)
    if eof:
        assert state is State.CLOSED
        assert isinstance(events[-1], (PeerClosed, QuitRequested))
