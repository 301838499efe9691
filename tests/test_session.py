"""The asyncio adapter around the line protocol, driven with a fake transport and hub."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from broker import ChatMessage, UserJoined, UserLeft
from chatwire.commands import HELP, History, Join, PrivateMessage, Rooms, Who
from chatwire.names import DEFAULT_ROOM, DEFAULT_ROOM_KEY
from chatwire.texts import (
    INTERNAL_ERROR_TEXT,
    NOT_DELIVERED_TEXT,
    PROMPT,
    already_in_text,
    chat_line,
    error_line,
    goodbye_text,
    in_room_text,
    kicked_text,
    notice_line,
    slow_down_text,
    welcome_text,
)
from gateway.metrics import Refusal
from gateway.rooms import Room
from gateway.session import MAX_OUTGOING_BYTES, MAX_UNPUBLISHED, Session
from tests.support import Timers

PROMPT_LINE = notice_line(PROMPT)
WELCOME = notice_line(welcome_text("alice", 1))


class FakeTransport(asyncio.Transport):
    """Records every call; reports whatever write buffer size the test sets."""

    def __init__(self, peer: Any = ("192.0.2.7", 50123)) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.written: list[bytes] = []
        self.buffer_size = 0
        self.closing = False
        self.paused = False
        self._peer = peer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.calls.append("write")
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffer_size

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")
        self.paused = True

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default

    @property
    def output(self) -> bytes:
        return b"".join(self.written)


class FakeHub:
    """Records the calls a session makes (with the session's room at the time); optionally
    raises from one of them."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.rooms: list[str] = []
        self.fail_on = fail_on
        self.holding = False

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        if call[0] == self.fail_on:
            raise RuntimeError(f"hub failure in {call[0]}")

    def session_started(self, session: Session) -> None:
        self._record("session_started", session)

    def session_ended(self, session: Session) -> None:
        self._record("session_ended", session)

    def login(self, session: Session, name: str, key: str) -> None:
        self._record("login", session, name, key)

    def publish(self, session: Session, text: str) -> None:
        self.rooms.append(session.room_key)
        self._record("publish", session, text)

    def command(self, session: Session, request: Any) -> None:
        self._record("command", session, request)

    def hold_input(self, session: Session) -> bool:
        """As a busy gateway's publisher does when ``holding``: input waits for its batch."""
        return self.holding

    def named(self, kind: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == kind]

    def texts(self) -> list[str]:
        return [call[2] for call in self.named("publish")]


def connect(
    hub: FakeHub | None = None, limits: tuple[float, float] | None = None
) -> tuple[Session, FakeTransport, FakeHub]:
    hub = hub or FakeHub()
    transport = FakeTransport()
    session = Session(hub, "sess-1", limits)
    session.connection_made(transport)
    return session, transport, hub


def logged_in(
    name: str = "alice", online: int = 1, limits: tuple[float, float] | None = None
) -> tuple[Session, FakeTransport, FakeHub]:
    session, transport, hub = connect(limits=limits)
    session.data_received(f"{name}\n".encode())
    assert session.accept(online)
    session.resume()
    transport.written.clear()
    transport.calls.clear()
    return session, transport, hub


def moving(room: str = "#math") -> tuple[Session, FakeTransport, FakeHub]:
    """A logged-in session that just asked to join ``room``."""
    session, transport, hub = logged_in()
    session.data_received(f"/join {room}\n".encode())
    transport.written.clear()
    transport.calls.clear()
    return session, transport, hub


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flood control sees one instant: no token refills between lines."""
    monkeypatch.setattr("gateway.session.time", SimpleNamespace(monotonic=lambda: 1000.0))


# -- connection and login ------------------------------------------------------------------


def test_connection_made_writes_the_prompt_and_starts_the_session() -> None:
    """connection_made() records the peer, tells the hub and writes the name prompt."""
    session, transport, hub = connect()
    assert transport.output == PROMPT_LINE
    assert hub.calls == [("session_started", session)]
    assert session.peer == "192.0.2.7:50123"
    assert session.address == "192.0.2.7"
    assert not session.joined
    assert not session.closed
    assert session.room == DEFAULT_ROOM
    assert session.room_key == DEFAULT_ROOM_KEY


def test_a_name_asks_the_hub_to_log_in_and_pauses_reading() -> None:
    """A proposed name calls hub.login(name, key) and stops reading until it is decided."""
    session, transport, hub = connect()
    session.data_received(b"Alice\r\n")
    assert hub.named("login") == [("login", session, "Alice", "alice")]
    assert transport.paused
    assert transport.calls == ["write", "pause_reading"]
    assert session.name is None


def test_accept_welcomes_but_input_waits_for_resume() -> None:
    """accept() writes the welcome and returns True; reading stays paused and the lines
    held during the claim wait until resume()."""
    session, transport, hub = connect()
    session.data_received(b"alice\nfirst\n")
    session.data_received(b"second\nthi")

    assert session.accept(3) is True

    assert session.joined
    assert session.name == "alice"
    assert transport.output == PROMPT_LINE + notice_line(welcome_text("alice", 3))
    assert hub.named("publish") == []
    assert transport.paused
    assert "resume_reading" not in transport.calls


def test_resume_after_accept_handles_held_lines_in_order_and_reads_on() -> None:
    """resume() publishes the lines held during the claim, in order, and resumes reading."""
    session, transport, hub = connect()
    session.data_received(b"alice\nfirst\n")
    session.data_received(b"second\nthi")
    session.data_received(b"rd\n")
    session.accept(3)
    assert hub.named("publish") == []

    session.resume()

    assert hub.texts() == ["first", "second", "third"]
    assert all(call[1] is session for call in hub.named("publish"))
    assert not transport.paused
    assert transport.calls[-1] == "resume_reading"


def test_accept_when_not_claiming_is_refused() -> None:
    """accept() outside a pending claim (or after the connection ended) returns False and
    does nothing."""
    session, transport, _ = connect()
    assert session.accept(1) is False
    assert not session.joined
    assert transport.output == PROMPT_LINE
    session.data_received(b"alice\n")
    session.connection_lost(None)
    assert session.accept(1) is False
    assert not session.joined
    assert transport.output == PROMPT_LINE


def test_reject_reports_the_reason_prompts_again_and_resumes() -> None:
    """reject() writes the reason and the prompt, and reading resumes for another name."""
    session, transport, hub = connect()
    session.data_received(b"alice\n")
    session.reject("the name alice is taken; choose another", Refusal.NAME_TAKEN)
    assert transport.output == (
        PROMPT_LINE + b"! the name alice is taken; choose another\n" + PROMPT_LINE
    )
    assert not transport.paused
    assert not session.joined
    session.data_received(b"bob\n")
    assert [call[2] for call in hub.named("login")] == ["alice", "bob"]


def test_reject_handles_a_name_sent_during_the_claim() -> None:
    """A second name typed while the first was being claimed is proposed after reject()."""
    session, _, hub = connect()
    session.data_received(b"alice\nbob\n")
    assert [call[2] for call in hub.named("login")] == ["alice"]
    session.reject("taken", Refusal.NAME_TAKEN)
    assert [call[2] for call in hub.named("login")] == ["alice", "bob"]


def test_reject_after_the_connection_ended_does_nothing() -> None:
    """reject() of a claim whose client hung up writes nothing."""
    session, transport, _ = connect()
    session.data_received(b"alice\n")
    session.connection_lost(None)
    session.reject("taken", Refusal.NAME_TAKEN)
    assert transport.output == PROMPT_LINE


def test_refuse_sends_only_the_reason_and_closes() -> None:
    """refuse() from session_started replaces the prompt with a ``! `` line and closes."""

    class RefusingHub(FakeHub):
        def session_started(self, session: Session) -> None:
            super().session_started(session)
            session.refuse("this server is full; try again later")

    _, transport, _ = connect(RefusingHub())
    assert transport.output == error_line("this server is full; try again later")
    assert transport.closing
    assert "close" in transport.calls


# -- output --------------------------------------------------------------------------------


def test_write_queues_data_below_the_bound() -> None:
    """write() passes data through while the queued total stays within MAX_OUTGOING_BYTES."""
    session, transport, _ = logged_in()
    data = b"bob: hi\n"
    transport.buffer_size = MAX_OUTGOING_BYTES - len(data)
    session.write(data)
    assert transport.written == [data]
    assert "abort" not in transport.calls


def test_write_past_the_outgoing_bound_aborts_instead_of_writing() -> None:
    """write() that would queue more than MAX_OUTGOING_BYTES aborts the client, writes nothing."""
    session, transport, _ = logged_in()
    data = b"bob: hi\n"
    transport.buffer_size = MAX_OUTGOING_BYTES - len(data) + 1
    session.write(data)
    assert transport.calls == ["abort"]
    assert transport.written == []
    session.write(data)  # the transport is closing now: nothing more is attempted
    assert transport.calls == ["abort"]


def test_notify_and_error_write_to_this_client_only() -> None:
    """notify() writes ``* `` lines and error() a ``! `` line, straight away."""
    session, transport, _ = logged_in()
    session.notify(["2 users online:", "  alice"])
    session.error("no user named bob is online", Refusal.NOT_ONLINE)
    assert transport.output == (
        notice_line("2 users online:")
        + notice_line("  alice")
        + error_line("no user named bob is online")
    )


def test_close_sends_a_last_notice_then_closes() -> None:
    """close(notice) writes the notice and closes the transport after it."""
    session, transport, _ = logged_in()
    session.close("Server restarting: please reconnect.")
    assert transport.output == notice_line("Server restarting: please reconnect.")
    assert transport.calls == ["write", "close"]


def test_kick_says_why_and_closes() -> None:
    """kick() writes the operator's reason as a ``! `` line, then closes."""
    session, transport, hub = logged_in()
    session.kick("spam")
    assert transport.output == error_line(kicked_text("spam"))
    assert transport.calls == ["write", "close"]
    session.data_received(b"hello\n")
    assert hub.named("publish") == []


def test_stop_reading_reads_nothing_more() -> None:
    """stop_reading() pauses the transport and ignores whatever still comes in."""
    session, transport, hub = logged_in()
    session.stop_reading()
    assert transport.paused
    session.data_received(b"hello\n")
    assert hub.named("publish") == []
    assert "close" not in transport.calls


def test_abort_drops_the_connection() -> None:
    """abort() aborts the transport."""
    session, transport, _ = logged_in()
    session.abort()
    assert transport.calls == ["abort"]


# -- input bounds and flood control --------------------------------------------------------


def test_too_many_unpublished_lines_pause_reading_until_published() -> None:
    """At MAX_UNPUBLISHED unpublished lines reading pauses; published() resumes it."""
    session, transport, hub = logged_in()
    session.data_received(b"".join(b"line %d\n" % i for i in range(MAX_UNPUBLISHED - 1)))
    assert len(hub.named("publish")) == MAX_UNPUBLISHED - 1
    assert not transport.paused
    session.data_received(b"one more\n")
    assert len(hub.named("publish")) == MAX_UNPUBLISHED
    assert transport.paused
    assert transport.calls.count("pause_reading") == 1

    session.published(True)
    assert not transport.paused
    assert transport.calls.count("resume_reading") == 1
    session.published(True)
    assert transport.calls.count("resume_reading") == 1  # no redundant resume
    assert transport.written == []


def test_a_busy_gateway_holds_input_until_its_next_batch_goes() -> None:
    """While the gateway holds input for its next batch, a client with a line waiting is
    not read; read_now() (the batch is about to go) reads it again; once nothing holds
    it, publishing resumes it as before."""
    session, transport, hub = logged_in()
    hub.holding = True
    session.data_received(b"one\n")
    assert transport.paused
    session.read_now()
    assert not transport.paused
    session.data_received(b"two\n")
    assert transport.paused  # held again, for the batch after
    hub.holding = False
    session.published(True)
    assert not transport.paused
    assert [call[2] for call in hub.named("publish")] == ["one", "two"]


def test_read_now_does_not_read_past_another_reason_to_wait() -> None:
    """read_now() lifts only the hold: a client at MAX_UNPUBLISHED stays unread."""
    session, transport, hub = logged_in()
    hub.holding = True
    session.data_received(b"".join(b"line %d\n" % i for i in range(MAX_UNPUBLISHED)))
    assert transport.paused
    session.read_now()
    assert transport.paused
    assert "resume_reading" not in transport.calls


def test_published_false_writes_an_error_line() -> None:
    """published(False) tells the client its line was not delivered, with a ``! `` line."""
    session, transport, _ = logged_in()
    session.data_received(b"hello\n")
    session.published(False)
    assert transport.output == error_line(NOT_DELIVERED_TEXT)
    assert "close" not in transport.calls


class Clock:
    """Flood control's clock, moved by the test; timers fire when the test says so."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr("gateway.session.time", SimpleNamespace(monotonic=lambda: self.now))
        self.timers = Timers(monkeypatch)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: the bucket refills and the pacing timer fires."""
        self.now += seconds
        self.timers.fire()


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


async def test_lines_over_the_rate_wait_their_turn(clock: Clock) -> None:
    """Past the burst, lines are not dropped: reading pauses, and each line is taken in
    when its token comes, in order; the client is told once."""
    session, transport, hub = logged_in(limits=(2, 2))
    clock.advance(10.0)  # the name line\'s token is back: the burst is whole
    session.data_received(b"one\ntwo\nthree\nfour\n")
    assert hub.texts() == ["one", "two"]
    assert transport.paused
    assert transport.output == notice_line(slow_down_text(2))
    assert [delay for delay, _, _ in clock.timers.scheduled] == [pytest.approx(0.5)]
    clock.advance(0.5)
    assert hub.texts() == ["one", "two", "three"]
    assert transport.paused
    clock.advance(0.5)
    assert hub.texts() == ["one", "two", "three", "four"]
    assert not transport.paused  # nothing waits: read on
    assert transport.output == notice_line(slow_down_text(2))  # told once
    assert "close" not in transport.calls


async def test_a_flood_is_slowed_never_cut(clock: Clock) -> None:
    """Many lines at once: none is dropped, the connection stays, and while they wait
    nothing more is read from the client."""
    session, transport, hub = logged_in(limits=(1, 1))
    clock.advance(10.0)  # the name line\'s token is back: the burst is whole
    count = MAX_UNPUBLISHED - 1  # published() never comes here: stay under that bound
    session.data_received(b"".join(b"line %d\n" % i for i in range(count)))
    for n in range(1, count):
        assert hub.texts()[-1] == f"line {n - 1}"
        assert transport.paused
        clock.advance(1.0)
    assert hub.texts() == [f"line {i}" for i in range(count)]
    assert "close" not in transport.calls and not transport.paused


async def test_the_notice_comes_again_once_the_client_kept_within_its_rate(clock: Clock) -> None:
    """A second episode of going over the rate, after the bucket refilled, is told again."""
    session, transport, _ = logged_in(limits=(1, 1))
    clock.advance(10.0)  # the name line\'s token is back: the burst is whole
    session.data_received(b"a\nb\n")
    clock.advance(1.0)
    clock.advance(5.0)  # quiet: the bucket is full again
    session.data_received(b"c\nd\n")
    assert transport.output.count(notice_line(slow_down_text(1))) == 2


async def test_commands_are_paced_like_lines(clock: Clock) -> None:
    """A command over the rate waits its turn like a message, then reaches the hub."""
    session, _, hub = logged_in(limits=(1, 1))
    clock.advance(10.0)  # the name line\'s token is back: the burst is whole
    session.data_received(b"hello\n/who\n")
    assert hub.named("command") == []
    clock.advance(1.0)
    assert [call[2] for call in hub.named("command")] == [Who()]


async def test_a_join_over_the_rate_is_delayed_and_what_follows_waits_for_it(
    clock: Clock,
) -> None:
    """A /join over the rate is asked of the hub when its turn comes; the line after it
    waits for the move, then for its own turn, and goes to the new room."""
    session, transport, hub = logged_in(limits=(1, 1))
    clock.advance(10.0)  # the name line\'s token is back: the burst is whole
    session.data_received(b"hello\n/join #math\nin math\n")
    assert hub.named("command") == []
    clock.advance(1.0)
    assert [call[2] for call in hub.named("command")] == [Join("#math", "#math")]
    assert transport.paused  # moving
    session.moved("#math", "#math", 2)
    session.resume()
    clock.advance(1.0)
    assert hub.texts() == ["hello", "in math"]
    assert session.room_key == "#math"


async def test_quit_behind_paced_lines_still_says_goodbye(clock: Clock) -> None:
    """A ``sair`` sent behind lines over the rate is taken in its turn, and answered."""
    session, transport, hub = logged_in(limits=(1, 1))
    clock.advance(10.0)  # the name line\'s token is back: the burst is whole
    session.data_received(b"hello\nagain\nsair\n")
    assert "close" not in transport.calls
    clock.advance(1.0)
    clock.advance(1.0)
    assert hub.texts() == ["hello", "again"]
    assert transport.output.endswith(notice_line(goodbye_text("alice")))
    assert transport.calls[-1] == "close"


async def test_a_closed_connection_stops_pacing(clock: Clock) -> None:
    """connection_lost cancels the pacing timer: nothing is taken in afterwards."""
    session, _, hub = logged_in(limits=(1, 1))
    clock.advance(10.0)  # the name line\'s token is back: the burst is whole
    session.data_received(b"a\nb\n")
    session.connection_lost(None)
    assert clock.timers.pending() == []
    assert hub.texts() == ["a"]


# -- commands ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"/who", Who()),
        (b"/rooms", Rooms()),
        (b"/history", History(None)),
        (b"/history 5", History(5)),
        (b"/msg Bob hi there", PrivateMessage("Bob", "bob", "hi there")),
    ],
)
def test_a_command_is_passed_to_the_hub_and_reading_goes_on(line: bytes, expected: Any) -> None:
    """Commands the gateway serves reach hub.command(session, request); input is not held."""
    session, transport, hub = logged_in()
    session.data_received(line + b"\nafter\n")
    assert hub.named("command") == [("command", session, expected)]
    assert hub.texts() == ["after"]
    assert not transport.paused
    assert transport.written == []


def test_help_is_answered_without_the_hub() -> None:
    """``/help`` is answered by the protocol: the help lines, no hub call."""
    session, transport, hub = logged_in()
    session.data_received(b"/help\n")
    assert transport.output == b"".join(notice_line(text) for text in HELP)
    assert hub.named("command") == []


def test_joining_the_current_room_is_answered_without_the_hub() -> None:
    """``/join`` of the room the user is in says so, with no move."""
    session, transport, hub = logged_in()
    session.data_received(b"/join #LOBBY\n")
    assert transport.output == notice_line(already_in_text(DEFAULT_ROOM))
    assert hub.named("command") == []
    assert not transport.paused


def test_a_bad_command_is_answered_without_the_hub() -> None:
    """An unknown command gets a ``! `` line; the hub never hears of it."""
    session, transport, hub = logged_in()
    session.data_received(b"/frobnicate\n")
    assert transport.output.startswith(b"! unknown command /frobnicate")
    assert hub.named("command") == []


# -- moving between rooms ------------------------------------------------------------------


def test_join_asks_the_hub_and_holds_input_until_the_move_is_settled() -> None:
    """``/join`` calls hub.command with a Join request and pauses reading; lines after it
    wait."""
    session, transport, hub = logged_in()
    session.data_received(b"/join #Math\nhello\n")
    assert hub.named("command") == [("command", session, Join("#Math", "#math"))]
    assert hub.named("publish") == []
    assert transport.paused
    session.published(True)  # a line leaving the queue does not resume reading meanwhile
    assert transport.paused


def test_moved_announces_the_room_and_resume_sends_later_lines_there() -> None:
    """moved() says where the user is; after resume() the held lines go to the new room."""
    session, transport, hub = moving()
    session.data_received(b"hello\n")
    session.moved("#Math", "#math", 3)
    assert transport.output == notice_line(in_room_text("#Math", 3))
    assert session.room == "#Math"
    assert session.room_key == "#math"
    assert hub.named("publish") == []  # input still waits for resume()
    assert transport.paused
    session.resume()
    assert hub.texts() == ["hello"]
    assert hub.rooms == ["#math"]
    assert not transport.paused


def test_move_failed_says_why_keeps_the_room_and_reads_on() -> None:
    """move_failed(reason) writes the reason, leaves the room as it was and resumes input."""
    session, transport, hub = moving()
    session.data_received(b"hello\n")
    session.move_failed("could not change rooms")
    assert transport.output == error_line("could not change rooms")
    assert session.room_key == DEFAULT_ROOM_KEY
    assert hub.texts() == ["hello"]
    assert hub.rooms == [DEFAULT_ROOM_KEY]
    assert not transport.paused


def test_moved_when_not_moving_is_ignored() -> None:
    """moved() without a pending move (or after the client hung up) changes nothing."""
    session, transport, _ = logged_in()
    session.moved("#Math", "#math", 2)
    assert session.room_key == DEFAULT_ROOM_KEY
    assert transport.written == []
    session, transport, _ = moving()
    session.connection_lost(None)
    session.moved("#Math", "#math", 2)
    assert session.room_key == DEFAULT_ROOM_KEY
    assert transport.written == []


def test_a_second_join_after_a_move_moves_again() -> None:
    """After a move, ``/part`` asks to go back to the default room."""
    session, _, hub = moving()
    session.data_received(b"/part\n")
    session.moved("#math", "#math", 1)
    session.resume()
    assert hub.named("command")[-1] == ("command", session, Join(DEFAULT_ROOM, DEFAULT_ROOM_KEY))


def test_eof_during_a_move_closes_once_the_move_is_done() -> None:
    """An EOF while moving is honoured after the move: held lines first, then close."""
    session, transport, hub = moving()
    session.data_received(b"bye all")
    assert session.eof_received() is True
    assert "close" not in transport.calls
    session.moved("#math", "#math", 1)
    session.resume()
    assert hub.texts() == ["bye all"]
    assert hub.rooms == ["#math"]
    assert transport.calls[-1] == "close"


# -- quitting and the end of the connection ------------------------------------------------


@pytest.mark.parametrize("word", [b"sair", b"SAIR", b"/quit"])
def test_quit_writes_the_goodbye_and_closes(word: bytes) -> None:
    """``sair`` (or /quit) writes the goodbye line and then closes the transport."""
    session, transport, hub = logged_in("alice")
    session.data_received(word + b"\nnot sent\n")
    assert transport.output == notice_line(goodbye_text("alice"))
    assert transport.calls == ["write", "close"]
    assert hub.named("publish") == []


def test_quit_before_a_name_writes_a_plain_goodbye() -> None:
    """``sair`` at the name prompt says goodbye without a name and closes."""
    session, transport, hub = connect()
    session.data_received(b"sair\n")
    assert transport.output == PROMPT_LINE + notice_line(goodbye_text(None))
    assert transport.calls[-1] == "close"
    assert hub.named("login") == []


def test_eof_closes_after_answering_the_lines_sent_before() -> None:
    """At EOF the lines sent before it are handled, then the transport is closed."""
    session, transport, hub = logged_in()
    session.data_received(b"last words")
    assert session.eof_received() is True
    assert hub.texts() == ["last words"]
    assert transport.calls[-1] == "close"


def test_eof_during_a_claim_waits_for_the_outcome() -> None:
    """An EOF while the name is being claimed closes only after accept() and resume()."""
    session, transport, hub = connect()
    session.data_received(b"alice\nhi")
    session.eof_received()
    assert "close" not in transport.calls
    session.accept(1)
    session.resume()
    assert hub.texts() == ["hi"]
    assert transport.calls[-1] == "close"


def test_connection_lost_ends_the_session_once() -> None:
    """connection_lost() marks the session closed and calls hub.session_ended exactly once."""
    session, _, hub = logged_in()
    session.connection_lost(None)
    assert session.closed
    assert hub.named("session_ended") == [("session_ended", session)]
    session.data_received(b"ignored\n")
    session.resume()
    assert hub.named("publish") == []
    assert hub.named("session_ended") == [("session_ended", session)]


@pytest.mark.parametrize("failing", ["login", "publish", "command"])
def test_a_hub_exception_does_not_propagate(failing: str) -> None:
    """An error raised by the hub is contained: ``! internal error`` is sent and it closes."""
    session, transport, hub = connect(FakeHub(fail_on=failing))
    session.data_received(b"alice\n")
    if failing != "login":
        session.accept(1)
        session.resume()
        session.data_received(b"/who\n" if failing == "command" else b"hello\n")
    assert hub.named(failing)
    assert transport.written[-1] == error_line(INTERNAL_ERROR_TEXT)
    assert transport.calls[-1] == "close"
    assert transport.calls.count("close") == 1


# -- with a real room: what a newcomer sees, in order --------------------------------------


async def test_room_traffic_waits_for_the_joiners_history() -> None:
    """Admitted before its history arrived, a joiner gets welcome, history, then the room
    traffic that came meanwhile, in that order."""
    room = Room(DEFAULT_ROOM_KEY)
    session, transport, _ = connect()
    session.data_received(b"alice\n")
    admitted = room.expect(session)
    room.deliver_batch([UserJoined("1-0", "alice", "gw", session.id)])
    assert admitted.done()
    session.accept(2)
    room.deliver_batch([ChatMessage("2-0", "bob", "live one")])
    room.deliver_batch([ChatMessage("3-0", "bob", "live two")])
    assert transport.output == PROMPT_LINE + notice_line(welcome_text("alice", 2))
    room.enter(session, b"* [history] old\n")
    assert transport.output == (
        PROMPT_LINE
        + notice_line(welcome_text("alice", 2))
        + b"* [history] old\n"
        + chat_line("bob", "live one")
        + chat_line("bob", "live two")
    )


async def test_history_that_arrives_first_follows_the_welcome() -> None:
    """History at hand before the join event is written right after the welcome; live
    traffic follows the join."""
    room = Room(DEFAULT_ROOM_KEY)
    session, transport, _ = connect()
    session.data_received(b"alice\n")
    room.expect(session)
    session.accept(1)
    room.enter(session, b"* [history] old\n")
    session.resume()
    room.deliver_batch([UserJoined("1-0", "alice", "gw", session.id)])
    room.deliver_batch([ChatMessage("2-0", "bob", "live")])
    assert transport.output == (
        PROMPT_LINE + WELCOME + b"* [history] old\n" + chat_line("bob", "live")
    )


async def test_a_quit_during_entry_comes_after_what_was_held() -> None:
    """``sair`` sent along with the name is answered after the welcome, the history and
    the traffic held meanwhile, then the connection closes."""
    room = Room(DEFAULT_ROOM_KEY)
    session, transport, _ = connect()
    session.data_received(b"alice\nsair\n")
    room.expect(session)
    room.deliver_batch([UserJoined("1-0", "alice", "gw", session.id)])
    session.accept(1)
    room.deliver_batch([ChatMessage("2-0", "bob", "live")])
    assert "close" not in transport.calls
    room.enter(session, b"* [history] old\n")
    session.resume()
    assert transport.output == (
        PROMPT_LINE
        + WELCOME
        + b"* [history] old\n"
        + chat_line("bob", "live")
        + notice_line(goodbye_text("alice"))
    )
    assert transport.calls[-1] == "close"


async def test_a_mover_sees_where_it_is_then_the_new_rooms_history_and_traffic() -> None:
    """On a move the user sees the old room up to its leave, the new room's notice, its
    history, then what the new room said meanwhile."""
    old, new = Room(DEFAULT_ROOM_KEY), Room("#math")
    session, transport, _ = connect()
    session.data_received(b"alice\n")
    old.expect(session)
    old.deliver_batch([UserJoined("1-0", "alice", "gw", session.id)])
    session.accept(1)
    old.enter(session, b"")
    session.resume()
    session.data_received(b"/join #math\n")
    transport.written.clear()

    new.expect(session)
    new.deliver_batch([UserJoined("5-0", "alice", "gw", session.id, "#math")])
    new.deliver_batch([ChatMessage("6-0", "carol", "in math")])
    leaving = old.expect_leave(session)
    old.deliver_batch([ChatMessage("2-0", "bob", "in lobby")])
    old.deliver_batch([UserLeft("3-0", "alice", "gw", session.id, "#math")])
    assert leaving.done()
    old.deliver_batch([ChatMessage("4-0", "bob", "too late")])
    session.moved("#math", "#math", 2)
    new.enter(session, b"* [history] math\n")
    session.resume()
    assert transport.output == (
        chat_line("bob", "in lobby")
        + notice_line(in_room_text("#math", 2))
        + b"* [history] math\n"
        + chat_line("carol", "in math")
    )
