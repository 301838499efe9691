"""The asyncio adapter around the line protocol, driven with a fake transport and hub."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatwire.texts import PROMPT, goodbye_text, notice_line, welcome_text
from gateway.session import MAX_OUTGOING_BYTES, MAX_UNPUBLISHED, Session

PROMPT_LINE = notice_line(PROMPT)


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
    """Records the calls a session makes; optionally raises from one of them."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_on = fail_on

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
        self._record("publish", session, text)

    def who(self, session: Session) -> None:
        self._record("who", session)

    def named(self, kind: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == kind]


def connect(hub: FakeHub | None = None) -> tuple[Session, FakeTransport, FakeHub]:
    hub = hub or FakeHub()
    transport = FakeTransport()
    session = Session(hub, "sess-1")
    session.connection_made(transport)
    return session, transport, hub


def logged_in(name: str = "alice", online: int = 1) -> tuple[Session, FakeTransport, FakeHub]:
    session, transport, hub = connect()
    session.data_received(f"{name}\n".encode())
    session.accept(online)
    transport.written.clear()
    transport.calls.clear()
    return session, transport, hub


def test_connection_made_writes_the_prompt_and_starts_the_session() -> None:
    """connection_made() records the peer, tells the hub and writes the name prompt."""
    session, transport, hub = connect()
    assert transport.output == PROMPT_LINE
    assert hub.calls == [("session_started", session)]
    assert session.peer == "192.0.2.7:50123"
    assert not session.joined
    assert not session.closed


def test_a_name_asks_the_hub_to_log_in_and_pauses_reading() -> None:
    """A proposed name calls hub.login(name, key) and stops reading until it is decided."""
    session, transport, hub = connect()
    session.data_received(b"Alice\r\n")
    assert hub.named("login") == [("login", session, "Alice", "alice")]
    assert transport.paused
    assert transport.calls == ["write", "pause_reading"]
    assert session.name is None


def test_accept_welcomes_resumes_and_handles_buffered_lines_in_order() -> None:
    """accept() writes the welcome, resumes reading and publishes lines held during the claim."""
    session, transport, hub = connect()
    session.data_received(b"alice\nfirst\n")
    session.data_received(b"second\nthi")
    assert hub.named("publish") == []
    session.data_received(b"rd\n")
    assert hub.named("publish") == []

    session.accept(3)

    assert session.joined
    assert session.name == "alice"
    assert transport.output == PROMPT_LINE + notice_line(welcome_text("alice", 3))
    assert [call[2] for call in hub.named("publish")] == ["first", "second", "third"]
    assert all(call[1] is session for call in hub.named("publish"))
    assert not transport.paused
    assert transport.calls[-2:] == ["write", "resume_reading"]


def test_accept_when_not_claiming_is_ignored() -> None:
    """accept() outside a pending claim (or after the connection ended) does nothing."""
    session, transport, _ = connect()
    session.accept(1)
    assert not session.joined
    assert transport.output == PROMPT_LINE
    session.data_received(b"alice\n")
    session.connection_lost(None)
    session.accept(1)
    assert not session.joined
    assert transport.output == PROMPT_LINE


def test_reject_reports_the_reason_prompts_again_and_resumes() -> None:
    """reject() writes the reason and the prompt, and reading resumes for another name."""
    session, transport, hub = connect()
    session.data_received(b"alice\n")
    session.reject("the name alice is taken; choose another")
    assert transport.output == (
        PROMPT_LINE + b"! the name alice is taken; choose another\n" + PROMPT_LINE
    )
    assert not transport.paused
    session.data_received(b"bob\n")
    assert [call[2] for call in hub.named("login")] == ["alice", "bob"]


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


def test_published_false_writes_an_error_line() -> None:
    """published(False) tells the client its line was not delivered, with a ``! `` line."""
    session, transport, _ = logged_in()
    session.data_received(b"hello\n")
    session.published(False)
    assert len(transport.written) == 1
    assert transport.output.startswith(b"! not delivered")
    assert transport.output.endswith(b"\n")
    assert "close" not in transport.calls


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
    assert [call[2] for call in hub.named("publish")] == ["last words"]
    assert transport.calls[-1] == "close"


def test_connection_lost_ends_the_session_once() -> None:
    """connection_lost() marks the session closed and calls hub.session_ended exactly once."""
    session, _, hub = logged_in()
    session.connection_lost(None)
    assert session.closed
    assert hub.named("session_ended") == [("session_ended", session)]
    session.data_received(b"ignored\n")
    assert hub.named("publish") == []
    assert hub.named("session_ended") == [("session_ended", session)]


@pytest.mark.parametrize("failing", ["login", "publish"])
def test_a_hub_exception_does_not_propagate(failing: str) -> None:
    """An error raised by the hub is contained: ``! internal error`` is sent and it closes."""
    session, transport, hub = connect(FakeHub(fail_on=failing))
    session.data_received(b"alice\n")
    if failing == "publish":
        session.accept(1)
        session.data_received(b"hello\n")
    assert hub.named(failing)
    assert transport.written[-1].startswith(b"! internal error")
    assert transport.calls[-1] == "close"
    assert transport.calls.count("close") == 1


def test_who_calls_the_hub() -> None:
    """``/who`` asks the hub for the user list; nothing is published."""
    session, transport, hub = logged_in()
    session.data_received(b"/who\n")
    assert hub.named("who") == [("who", session)]
    assert hub.named("publish") == []
    assert transport.written == []


def test_close_sends_a_last_notice_then_closes() -> None:
    """close(notice) writes the notice and closes the transport after it."""
    session, transport, _ = logged_in()
    session.close("Server restarting: please reconnect.")
    assert transport.output == notice_line("Server restarting: please reconnect.")
    assert transport.calls == ["write", "close"]


def test_room_traffic_waits_for_the_joiners_history() -> None:
    """Admitted before its history arrived, a joiner gets welcome, history, then the room
    traffic that came meanwhile, in that order."""
    session, transport, _ = connect()
    session.data_received(b"alice\n")
    session.expect_history()
    session.accept(2)
    session.write(b"bob: live one\n")
    session.write(b"bob: live two\n")
    assert transport.output == PROMPT_LINE + notice_line(welcome_text("alice", 2))
    session.history_ready(b"* [history] old\n")
    assert transport.output == (
        PROMPT_LINE
        + notice_line(welcome_text("alice", 2))
        + b"* [history] old\nbob: live one\nbob: live two\n"
    )


def test_history_that_arrives_first_follows_the_welcome() -> None:
    """History fetched before the admission is written right after the welcome."""
    session, transport, _ = connect()
    session.data_received(b"alice\n")
    session.expect_history()
    session.history_ready(b"* [history] old\n")
    session.accept(1)
    session.write(b"bob: live\n")
    assert transport.output == (
        PROMPT_LINE + notice_line(welcome_text("alice", 1)) + b"* [history] old\nbob: live\n"
    )


def test_closing_before_history_still_sends_what_was_held() -> None:
    """A joiner closing before its history came still gets the lines held for it."""
    session, transport, _ = connect()
    session.data_received(b"alice\n")
    session.expect_history()
    session.accept(1)
    session.write(b"bob: live\n")
    session.data_received(b"sair\n")
    assert transport.output.endswith(b"bob: live\n* Goodbye, alice!\n")
    assert transport.calls[-1] == "close"
