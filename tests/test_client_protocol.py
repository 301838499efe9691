"""The client's pure parts: ClientProtocol and its helpers, Backoff, and terminal rendering."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatwire.errors import LocalProtocolError
from chatwire.lines import MAX_LINE_BYTES
from chatwire.texts import welcome_text
from client.protocol import (
    MAX_SERVER_LINE_BYTES,
    PROMPT_LINE,
    ClientProtocol,
    Closed,
    Event,
    Kind,
    NameRefused,
    Prompted,
    Received,
    ServerLine,
    State,
    Welcomed,
    classify,
    expects_answer,
    is_quit,
)
from client.session import Backoff
from client.terminal import PALETTE, name_colour, render
from gateway.protocol import (
    CommandRequested,
    MessageReceived,
    QuitRequested,
    ServerProtocol,
)

PROMPT = PROMPT_LINE.encode() + b"\n"


# --- helpers ------------------------------------------------------------------------------


def welcome(name: str, online: int = 2) -> bytes:
    return f"* {welcome_text(name, online)}\n".encode()


def claiming(name: str = "alice") -> ClientProtocol:
    """A protocol that was prompted and sent ``name``, its output read."""
    proto = ClientProtocol()
    assert proto.receive_data(PROMPT) == [Prompted(classify(PROMPT_LINE))]
    proto.send_name(name)
    assert proto.data_to_send() == name.encode() + b"\n"
    return proto


def chatting(name: str = "alice") -> ClientProtocol:
    """A protocol logged in as ``name``, its output read."""
    proto = claiming(name)
    [event] = proto.receive_data(welcome(name))
    assert isinstance(event, Welcomed)
    return proto


def closed() -> ClientProtocol:
    proto = ClientProtocol()
    assert proto.receive_eof() == [Closed()]
    return proto


def server_chatting(name: str = "alice") -> ServerProtocol:
    """The gateway's side of a connection logged in as ``name``, its output read."""
    server = ServerProtocol()
    server.data_to_send()
    server.receive_data(name.encode() + b"\n")
    server.events_received()
    server.accept_name(1)
    server.data_to_send()
    return server


def text(events: list[Event]) -> list[str]:
    return [e.line.raw for e in events if isinstance(e, Received)]


# --- classify -----------------------------------------------------------------------------


def test_classify_chat_splits_at_the_first_colon_space() -> None:
    """A chat line's name ends at the first ': '; later ones belong to the text."""
    line = classify("bob: hi: there")
    assert line == ServerLine("bob: hi: there", Kind.CHAT, "hi: there", "bob")


def test_classify_chat_with_empty_text() -> None:
    """'NAME: ' with nothing after it is still a chat line, with empty text."""
    assert classify("bob: ") == ServerLine("bob: ", Kind.CHAT, "", "bob")


def test_classify_notice() -> None:
    """'* TEXT' is a notice whose text drops the marker."""
    line = classify("* alice joined the chat")
    assert line == ServerLine("* alice joined the chat", Kind.NOTICE, "alice joined the chat")
    assert line.name is None


def test_classify_error() -> None:
    """'! TEXT' is an error whose text drops the marker."""
    line = classify("! the name bob is taken; choose another")
    assert line.kind is Kind.ERROR
    assert line.text == "the name bob is taken; choose another"
    assert line.name is None


@pytest.mark.parametrize(
    "raw",
    ["hello", "two words: x", ": no name", "bob:hi", "", "*no space", "!bang", "*", "!"],
)
def test_classify_odd_lines_are_shown_as_they_came(raw: str) -> None:
    """A line of no known shape is a notice carrying the whole raw line."""
    assert classify(raw) == ServerLine(raw, Kind.NOTICE, raw)


# --- login --------------------------------------------------------------------------------


def test_new_protocol_waits_for_the_prompt() -> None:
    """A new connection is CONNECTED, nameless, with nothing to send."""
    proto = ClientProtocol()
    assert proto.state is State.CONNECTED
    assert proto.name is None
    assert proto.data_to_send() == b""
    assert proto.answers_due == 0


def test_login_flow_with_a_refusal() -> None:
    """Prompt, name, refusal, prompt again, another name, welcome: each step's event and
    state."""
    proto = ClientProtocol()
    assert proto.receive_data(PROMPT) == [Prompted(classify(PROMPT_LINE))]
    assert proto.state is State.NAMING

    proto.send_name("bob")
    assert proto.state is State.CLAIMING
    assert proto.data_to_send() == b"bob\n"

    refusal = "! the name bob is taken; choose another"
    assert proto.receive_data(refusal.encode() + b"\n") == [NameRefused(classify(refusal))]
    assert proto.state is State.CLAIMING
    assert proto.receive_data(PROMPT) == [Prompted(classify(PROMPT_LINE))]
    assert proto.state is State.NAMING

    proto.send_name("carol")
    assert proto.data_to_send() == b"carol\n"
    raw = welcome("carol", 3)
    assert proto.receive_data(raw) == [Welcomed("carol", 3, classify(raw.decode()[:-1]))]
    assert proto.state is State.CHATTING
    assert proto.name == "carol"


def test_refusal_and_prompt_in_one_read() -> None:
    """A refusal and the next prompt arriving together give both events, in order."""
    proto = claiming("bob")
    events = proto.receive_data(b"! invalid name: bad\r\n* Choose a name:\r\n")
    assert [type(e) for e in events] == [NameRefused, Prompted]
    assert isinstance(events[0], NameRefused)
    assert events[0].line.text == "invalid name: bad"
    assert proto.state is State.NAMING


def test_welcome_for_one_user() -> None:
    """'1 user online' (singular) is a welcome too, with online == 1."""
    proto = claiming("Zoë")
    [event] = proto.receive_data(welcome("Zoë", 1))
    assert isinstance(event, Welcomed)
    assert (event.name, event.online) == ("Zoë", 1)
    assert proto.name == "Zoë"


def test_welcome_name_is_the_servers_display_form() -> None:
    """The accepted name is the one the welcome states, not the one typed."""
    proto = claiming("  dave ")
    proto.receive_data(welcome("dave"))
    assert proto.name == "dave"


def test_lines_before_the_verdict_are_received() -> None:
    """While claiming, a line that is neither refusal nor welcome is just received."""
    proto = claiming("bob")
    assert text(proto.receive_data(b"* something else\n")) == ["* something else"]
    assert proto.state is State.CLAIMING


def test_prompt_while_chatting_is_just_a_line() -> None:
    """Once chatting, a line equal to the prompt is not a new login step."""
    proto = chatting()
    assert proto.receive_data(PROMPT) == [Received(classify(PROMPT_LINE))]
    assert proto.state is State.CHATTING


def test_welcome_while_chatting_is_just_a_line() -> None:
    """Once chatting, a welcome-shaped line does not rename the user."""
    proto = chatting("alice")
    [event] = proto.receive_data(welcome("mallory"))
    assert isinstance(event, Received)
    assert proto.name == "alice"


@pytest.mark.parametrize(
    "make", [ClientProtocol, claiming, chatting, closed], ids=["connected", "claiming",
                                                              "chatting", "closed"]
)  # fmt: skip
def test_send_name_in_the_wrong_state_raises(make: object) -> None:
    """A name can only be sent right after a prompt."""
    proto = make()  # type: ignore[operator]
    state = proto.state
    with pytest.raises(LocalProtocolError):
        proto.send_name("bob")
    assert proto.state is state
    assert proto.data_to_send() == b""


def naming() -> ClientProtocol:
    proto = ClientProtocol()
    proto.receive_data(PROMPT)
    return proto


@pytest.mark.parametrize(
    "make", [ClientProtocol, naming, claiming, closed], ids=["connected", "naming",
                                                            "claiming", "closed"]
)  # fmt: skip
def test_send_line_in_the_wrong_state_raises(make: object) -> None:
    """Lines can only be sent while chatting."""
    proto = make()  # type: ignore[operator]
    with pytest.raises(LocalProtocolError):
        proto.send_line("hello")
    assert proto.data_to_send() == b""
    assert proto.answers_due == 0


def test_send_line_makes_one_line_of_embedded_cr_lf() -> None:
    """CR and LF inside a line become spaces: one line on the wire, never two."""
    proto = chatting()
    proto.send_line("a\r\nb\nc\r")
    assert proto.data_to_send() == b"a  b c \n"


def test_send_name_makes_one_line_of_embedded_cr_lf() -> None:
    """A name with a line break is still sent as one line."""
    proto = naming()
    proto.send_name("bo\nb\r")
    assert proto.data_to_send() == b"bo b \n"


def test_data_to_send_accumulates_then_empties() -> None:
    """Lines queue in order until read; a second read gets nothing."""
    proto = chatting()
    proto.send_line("one")
    proto.send_line("twö")
    assert proto.data_to_send() == "one\ntwö\n".encode()
    assert proto.data_to_send() == b""


# --- answers due --------------------------------------------------------------------------


def test_message_counts_and_its_echo_settles_it() -> None:
    """A message is due one answer; its echo settles it."""
    proto = chatting("alice")
    proto.send_line("hello")
    assert proto.answers_due == 1
    assert text(proto.receive_data(b"alice: hello\n")) == ["alice: hello"]
    assert proto.answers_due == 0


def test_another_users_line_does_not_settle() -> None:
    """Other users' messages, joins and leaves are not our answers."""
    proto = chatting("alice")
    proto.send_line("hello")
    proto.receive_data(b"bob: hello\n* carol joined the chat\n* bob left the chat\n")
    assert proto.answers_due == 1


def test_echo_settles_one_answer_each() -> None:
    """Two messages need two echoes."""
    proto = chatting("alice")
    proto.send_line("one")
    proto.send_line("two")
    assert proto.answers_due == 2
    proto.receive_data(b"alice: one\n")
    assert proto.answers_due == 1
    proto.receive_data(b"alice: two\n")
    assert proto.answers_due == 0


def test_answers_due_never_goes_negative() -> None:
    """An echo with nothing due (a line from another connection) leaves the count at 0."""
    proto = chatting("alice")
    proto.receive_data(b"alice: from elsewhere\n* 1 user online:\n! not delivered: x\n")
    assert proto.answers_due == 0


@pytest.mark.parametrize("command", ["/who", "/WHO", "  /who  ", "/who everyone"])
def test_who_counts_and_the_list_header_settles(command: str) -> None:
    """/who is due one answer; the '* N users online:' header settles it, the names don't."""
    proto = chatting("alice")
    proto.send_line(command)
    assert proto.answers_due == 1
    proto.receive_data(b"*   alice\n*   bob\n")
    assert proto.answers_due == 1
    proto.receive_data(b"* 2 users online:\n")
    assert proto.answers_due == 0


def test_who_header_for_one_user_settles() -> None:
    """The singular header '* 1 user online:' settles a /who too."""
    proto = chatting("alice")
    proto.send_line("/who")
    proto.receive_data(b"* 1 user online:\n*   alice\n")
    assert proto.answers_due == 0


def test_welcome_like_notice_does_not_settle_a_who() -> None:
    """'* 2 users online.' (not the list header) does not settle a /who."""
    proto = chatting("alice")
    proto.send_line("/who")
    proto.receive_data(b"* 2 users online.\n* 2 users online: alice\n")
    assert proto.answers_due == 1


@pytest.mark.parametrize(
    "line",
    [
        "/help",
        "/nope",
        "/",
        "/quit",
        "",
        "   ",
        "\t",
        "\x00\x07\x1b",
    ],
    ids=["help", "unknown", "slash", "quit", "empty", "blank", "tab", "controls"],
)  # fmt: skip
def test_lines_the_room_does_not_answer_do_not_count(line: str) -> None:
    """Commands answered at once and ignored lines are due nothing."""
    assert not expects_answer(line)
    proto = chatting()
    proto.send_line(line)
    assert proto.answers_due == 0


@pytest.mark.parametrize(
    "line", ["hello", "//who", "//", " indented", "x" * MAX_LINE_BYTES, "é" * (MAX_LINE_BYTES // 2)]
)
def test_messages_count(line: str) -> None:
    """Messages, '//'-escaped ones and lines of exactly the limit are due an echo."""
    assert expects_answer(line)
    proto = chatting()
    proto.send_line(line)
    assert proto.answers_due == 1


@pytest.mark.parametrize("line", ["x" * (MAX_LINE_BYTES + 1), "é" * (MAX_LINE_BYTES // 2 + 1)])
def test_an_over_long_line_is_due_its_refusal(line: str) -> None:
    """A line over the limit waits for the server's refusal, which names it as refused."""
    proto = chatting("alice")
    proto.send_line("fine")
    proto.send_line(line)
    assert proto.answers_due == 2
    proto.receive_data(b"! line too long: at most 4096 bytes; it was not sent\n")
    assert proto.answers_due == 1
    assert proto.refused == [(line, "line too long: at most 4096 bytes; it was not sent")]
    proto.receive_data(b"alice: fine\n")
    assert proto.answers_due == 0 and len(proto.refused) == 1


def test_refusals_name_the_oldest_line_of_their_kind() -> None:
    """'not delivered' refuses the oldest unanswered message; an unknown /msg name the
    oldest unanswered private message; the lists are answered apart."""
    proto = chatting("alice")
    for line in ("one", "/msg zed hi", "/who", "two"):
        proto.send_line(line)
    proto.receive_data(b"! no user named zed is online\n* 1 user online:\n")
    proto.receive_data(b"! not delivered: the chat service is unavailable; try again\n")
    assert proto.owed() == ["two"]
    assert [line for line, _ in proto.refused] == ["/msg zed hi", "one"]


def test_not_delivered_settles_one() -> None:
    """'! not delivered...' answers one message; other errors answer nothing."""
    proto = chatting("alice")
    proto.send_line("one")
    proto.send_line("two")
    proto.receive_data(b"! unknown command /x; type /help for the list\n")
    assert proto.answers_due == 2
    proto.receive_data(b"! line too long: at most 4096 bytes; it was not sent\n")
    assert proto.answers_due == 2  # no over-long line was sent: it refuses none of these
    proto.receive_data(b"! not delivered: the chat service is unavailable; try again\n")
    assert proto.answers_due == 1


@pytest.mark.parametrize(
    "line",
    ["hello", "/who", "/WHO all", "//who", "/help", "/nope", "", "  ", "\x07",
     "x" * (MAX_LINE_BYTES + 1), "/who\rnow", "/\r/x"],
    ids=["message", "who", "who-args", "escaped", "help", "unknown", "empty", "blank",
         "control", "long", "who-cr-word", "slash-cr-slash"],
)  # fmt: skip
def test_answers_due_agrees_with_the_gateway(line: str) -> None:
    """A line counts as due an answer exactly when the real gateway protocol, fed the bytes
    the client sends for it, relays it, serves a command for it, or refuses it as too
    long."""
    client = chatting("alice")
    client.send_line(line)
    server = server_chatting("alice")
    server.receive_data(client.data_to_send())
    answered = any(
        isinstance(e, MessageReceived | CommandRequested) for e in server.events_received()
    )
    refused = b"! line too long" in server.data_to_send()
    assert client.answers_due == int(answered or refused)


# --- quit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("line", ["sair", "SAIR", "/quit", "/QUIT", "  sair  ", "\t/Quit\t"])
def test_is_quit_words(line: str) -> None:
    """'sair' and '/quit', in any case and with white space around, are quit words."""
    assert is_quit(line)


@pytest.mark.parametrize("line", ["sair!", "sairx", "quit", "//quit", "", "/who", "sa ir"])
def test_is_quit_other_lines(line: str) -> None:
    """Anything else is not a quit word."""
    assert not is_quit(line)


@pytest.mark.parametrize("line", ["sair", "/Quit", " sair ", "/quit now", "/QUIT please", "hi"])
def test_is_quit_agrees_with_the_gateway(line: str) -> None:
    """The client takes a line for a quit exactly when the gateway does: otherwise the
    gateway's goodbye looks like a lost connection and the client logs in again."""
    client = chatting("alice")
    client.send_line(line)
    server = server_chatting("alice")
    server.receive_data(client.data_to_send())
    quits = any(isinstance(e, QuitRequested) for e in server.events_received())
    assert is_quit(line) == quits


# --- end of stream and framing ------------------------------------------------------------


def test_receive_eof_yields_the_unterminated_line_then_closed() -> None:
    """A last line without LF still counts; then Closed, and the state is CLOSED."""
    proto = chatting("alice")
    assert proto.receive_data(b"bob: complete\nbob: incompl") == [
        Received(classify("bob: complete"))
    ]
    assert proto.receive_eof() == [Received(classify("bob: incompl")), Closed()]
    assert proto.state is State.CLOSED


def test_receive_eof_without_partial_line_is_just_closed() -> None:
    """With nothing buffered, end of stream is only Closed."""
    proto = chatting()
    assert proto.receive_eof() == [Closed()]
    assert proto.state is State.CLOSED


def test_unterminated_echo_settles() -> None:
    """An unterminated last line is interpreted like any other: here an echo settles."""
    proto = chatting("alice")
    proto.send_line("hi")
    assert proto.receive_data(b"alice: hi") == []
    assert proto.answers_due == 1
    assert proto.receive_eof() == [Received(classify("alice: hi")), Closed()]
    assert proto.answers_due == 0


def test_crlf_and_invalid_utf8_from_the_server() -> None:
    """CRLF endings are accepted and invalid UTF-8 becomes U+FFFD."""
    proto = chatting()
    assert text(proto.receive_data(b"bob: a\r\nbob: \xff\n")) == ["bob: a", "bob: \ufffd"]


def test_over_long_server_line_is_skipped() -> None:
    """A server line past the bound is dropped whole; the next line comes through."""
    proto = chatting()
    long_line = b"bob: " + b"x" * MAX_SERVER_LINE_BYTES + b"\n"
    assert proto.receive_data(long_line + b"bob: next\n") == [Received(classify("bob: next"))]


# --- byte-by-byte equals whole: a property over server transcripts -------------------------

NAMES = st.sampled_from(["alice", "bob", "Zoë", "carol"])
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"),
    max_size=20,
)
SERVER_LINES = st.one_of(
    st.just(PROMPT_LINE),
    st.builds(lambda n, k: f"* {welcome_text(n, k)}", NAMES, st.integers(1, 99)),
    st.builds(lambda n: f"! the name {n} is taken; choose another", NAMES),
    st.just("! not delivered: the chat service is unavailable; try again"),
    st.builds(lambda n, t: f"{n}: {t}", NAMES, TEXT),
    st.builds(lambda k: f"* {k} users online:", st.integers(0, 9)),
    st.builds(lambda t: f"* {t}", TEXT),
    TEXT,
)
# What the user sends between server lines: a name when prompted, a chat line when chatting.
USER_LINES = st.sampled_from(["alice", "bob", "hello", "/who", "/help", "", "//x"])


@st.composite
def transcripts(draw: st.DrawFn) -> tuple[list[tuple[str, str]], bytes]:
    """Server lines with the user's input interleaved, and an unterminated tail."""
    steps = draw(st.lists(st.tuples(SERVER_LINES, USER_LINES), max_size=25))
    tail = draw(st.one_of(st.just(""), TEXT))
    return steps, tail.encode()


def replay(
    steps: list[tuple[str, str]], tail: bytes, chunks: list[int] | None
) -> tuple[list[Event], bytes, list[tuple[State, str | None, int]]]:
    """Feed a transcript (whole, or in chunks of the given sizes cycling), acting on it as
    a client would; return the events, what was sent, and the states seen."""
    proto = ClientProtocol()
    events: list[Event] = []
    states: list[tuple[State, str | None, int]] = []
    for server_line, user_line in steps:
        data = server_line.encode() + (b"\r\n" if len(server_line) % 2 else b"\n")
        if chunks is None:
            events += proto.receive_data(data)
        else:
            sizes = iter(chunks * (len(data) + 1))
            i = 0
            while i < len(data):
                n = next(sizes)
                events += proto.receive_data(data[i : i + n])
                i += n
        if proto.state is State.NAMING:
            proto.send_name(user_line)
        elif proto.state is State.CHATTING:
            proto.send_line(user_line)
        states.append((proto.state, proto.name, proto.answers_due))
    events += proto.receive_data(tail)
    events += proto.receive_eof()
    return events, proto.data_to_send(), states


@settings(max_examples=200, deadline=None)
@given(transcripts(), st.lists(st.integers(1, 7), min_size=1, max_size=5))
def test_split_feeding_equals_whole_feeding(
    transcript: tuple[list[tuple[str, str]], bytes], chunks: list[int]
) -> None:
    """Feeding a server transcript whole, byte by byte, or in any chunks gives the same
    events, the same output and the same states."""
    steps, tail = transcript
    whole = replay(steps, tail, None)
    assert replay(steps, tail, [1]) == whole
    assert replay(steps, tail, chunks) == whole
    assert isinstance(whole[0][-1], Closed)


# --- Backoff ------------------------------------------------------------------------------


def test_backoff_with_rng_one_gives_the_ceiling() -> None:
    """rng() == 1.0 gives exactly min(cap, base * 2^n) for attempt n."""
    backoff = Backoff(base=0.25, cap=10.0, rng=lambda: 1.0)
    assert [backoff.next() for _ in range(8)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.attempt == 8


def test_backoff_with_rng_zero_gives_zero() -> None:
    """rng() == 0.0 gives no delay at all, whatever the attempt."""
    backoff = Backoff(base=0.25, cap=10.0, rng=lambda: 0.0)
    assert [backoff.next() for _ in range(10)] == [0.0] * 10


@settings(max_examples=100, deadline=None)
@given(
    st.floats(0.001, 5.0),
    st.floats(0.001, 100.0),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60),
)
def test_backoff_delays_stay_within_full_jitter_bounds(
    base: float, cap: float, draws: list[float]
) -> None:
    """Each delay lies in [0, min(cap, base * 2^n)] and is that ceiling times the draw."""
    values = iter(draws)
    backoff = Backoff(base=base, cap=cap, rng=lambda: next(values))
    for n, draw in enumerate(draws):
        ceiling = min(cap, base * 2.0**n)
        delay = backoff.next()
        assert 0.0 <= delay <= ceiling
        assert delay == pytest.approx(ceiling * draw)


def test_backoff_cap_holds_for_large_n() -> None:
    """However many attempts (a client left reconnecting for hours), no delay exceeds the
    cap and next() never fails."""
    backoff = Backoff(base=0.25, cap=10.0, rng=lambda: 1.0)
    delays = [backoff.next() for _ in range(2000)]
    assert max(delays) == 10.0
    assert delays[-1] == 10.0


def test_backoff_reset_starts_over() -> None:
    """After reset() the next delay is the first attempt's again."""
    backoff = Backoff(base=0.5, cap=60.0, rng=lambda: 1.0)
    first = [backoff.next() for _ in range(5)]
    backoff.reset()
    assert backoff.attempt == 0
    assert [backoff.next() for _ in range(5)] == first == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_backoff_uses_random_by_default() -> None:
    """The default rng jitters within the bounds."""
    backoff = Backoff(base=1.0, cap=1.0)
    delays = {backoff.next() for _ in range(50)}
    assert all(0.0 <= d <= 1.0 for d in delays)
    assert len(delays) > 1


# --- terminal rendering -------------------------------------------------------------------


def plain(fragments: list[tuple[str, str]]) -> str:
    return "".join(fragment[1] for fragment in fragments)


def test_name_colour_is_stable_and_case_insensitive() -> None:
    """A name always gets the same palette colour, whatever its case."""
    assert name_colour("bob") == name_colour("bob") == name_colour("BOB") == name_colour("Bob")
    assert name_colour("Zoë") == name_colour("ZOË")
    assert name_colour("bob") in PALETTE


def test_name_colour_spreads_over_the_palette() -> None:
    """Different names do not all share one colour."""
    assert len({name_colour(f"user{i}") for i in range(100)}) > len(PALETTE) // 2


def test_render_others_message_in_the_name_colour() -> None:
    """Another user's name is bold in its colour; the text follows, unstyled."""
    ft = render(classify("bob: hi: there"), "alice", now=0)
    assert list(ft)[1:] == [(f"bold {name_colour('bob')}", "bob: "), ("", "hi: there")]
    assert "hi: there" in plain(list(ft))


def test_render_same_name_same_style_across_case() -> None:
    """'Bob' and 'BOB' (one user for the server) are drawn alike."""
    a = render(classify("Bob: x"), None, now=0)
    b = render(classify("BOB: x"), None, now=0)
    assert list(a)[1][0] == list(b)[1][0]


def test_render_own_message_is_bold_without_colour() -> None:
    """The user's own messages are bold and carry no palette colour."""
    ft = list(render(classify("alice: mine"), "alice", now=0))
    style, shown = ft[1]
    assert (style, shown) == ("bold", "alice: ")
    assert not any(colour in style for colour in PALETTE)
    assert plain(ft).endswith("alice: mine")


def test_render_error_is_red() -> None:
    """Errors are red and keep their '! ' marker."""
    ft = list(render(classify("! the name x is taken; choose another"), "alice", now=0))
    style, shown = ft[-1]
    assert "ansired" in style.split()
    assert shown == "! the name x is taken; choose another"


def test_render_notice_contains_its_text() -> None:
    """Notices are shown with their '* ' marker and text, not in a name colour."""
    ft = list(render(classify("* bob joined the chat"), "alice", now=0))
    assert plain(ft).endswith("* bob joined the chat")
    assert "ansired" not in ft[-1][0].split()


def test_render_odd_line_shows_the_whole_raw_line() -> None:
    """A line of no known shape is shown in full."""
    assert "two words: x" in plain(list(render(classify("two words: x"), None, now=0)))


def test_render_starts_with_a_timestamp() -> None:
    """Every line starts with the local HH:MM of ``now``."""
    now = 1_700_000_000.0
    ft = list(render(classify("bob: hi"), None, now=now))
    assert ft[0][1] == time.strftime("%H:%M ", time.localtime(now))


# --- rooms and private messages ---------------------------------------------------------------


def test_private_lines_are_classified_with_sender_and_recipient() -> None:
    """`(private) S: T` and `(private to R) S: T` are PRIVATE lines, not notices or chat."""
    received = classify("(private) bob: hi: there")
    assert (received.kind, received.name, received.to, received.text) == (
        Kind.PRIVATE, "bob", None, "hi: there",
    )  # fmt: skip
    echo = classify("(private to bob) alice: hi")
    assert (echo.kind, echo.name, echo.to, echo.text) == (Kind.PRIVATE, "alice", "bob", "hi")
    assert classify("(not private) x: y").kind is Kind.NOTICE


def test_render_marks_private_lines() -> None:
    """A private line is drawn with its own label and style, unlike a chat line."""
    private = render(classify("(private) bob: psst"), "alice", now=0)
    chat = render(classify("bob: psst"), "alice", now=0)
    assert "(private) " in "".join(text for _, text in private)
    assert {style for style, _ in private} != {style for style, _ in chat}


def test_the_room_follows_the_servers_notices() -> None:
    """The protocol tracks the room from `* You are in #ROOM now` and resets it on login."""
    proto = chatting("alice")
    assert proto.room == "#lobby"
    proto.receive_data(b"* You are in #Math now: 3 users here.\n")
    assert proto.room == "#Math"


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        ("/rooms", "* 2 rooms:"),
        ("/msg bob hi", "(private to bob) alice: hi"),
        ("/msg zed hi", "! no user named zed is online"),
        ("/who", "* 2 users in #math:"),
    ],
)
def test_commands_answered_later_are_waited_for(line: str, answer: str) -> None:
    """A pipe waits for the answer of /rooms, /msg and /who, and only for that."""
    proto = chatting("alice")
    proto.send_line(line)
    assert proto.answers_due == 1
    proto.receive_data(b"* bob joined #math\n")
    assert proto.answers_due == 1
    proto.receive_data(answer.encode() + b"\n")
    assert proto.answers_due == 0
