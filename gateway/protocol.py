"""The chat line protocol, server side, as a pure state machine: bytes in, events out.

Nothing here touches a socket or an event loop. The asyncio adapter (:mod:`gateway.session`)
feeds received bytes to :meth:`ServerProtocol.receive_data`, acts on the events from
:meth:`ServerProtocol.events_received` (claim a name, publish a message, serve a command)
and writes :meth:`ServerProtocol.data_to_send` to the transport. Everything the protocol can
answer on its own (bad names, over-long lines, unknown commands and bad arguments,
``/help``, ``/join`` of the room one is in) it answers on its own.

The wire format is written down in PROTOCOL.md; its words live in :mod:`chatwire`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from chatwire.commands import HELP, Help, Join, Quit, Request, parse_command
from chatwire.errors import InvalidName, LocalProtocolError, PeerProtocolError
from chatwire.lines import LineBuffer, TooLong, strip_controls
from chatwire.names import DEFAULT_ROOM, DEFAULT_ROOM_KEY, name_key, validate_name
from chatwire.texts import (
    LINE_TOO_LONG_TEXT,
    PROMPT,
    QUIT_WORDS,
    already_in_text,
    error_line,
    goodbye_text,
    in_room_text,
    notice_line,
    welcome_text,
)
from gateway.metrics import Counts, Refusal


def _is_quit(line: str) -> bool:
    return line.strip().lower() in QUIT_WORDS


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NameRequested:
    """The client proposed a well-formed name; the gateway must claim ``key`` cluster-wide."""

    name: str
    key: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A chat line to relay to the current room, control characters already removed."""

    text: str


@dataclass(frozen=True, slots=True)
class CommandRequested:
    """A command the gateway serves (everything but ``/help`` and ``/quit``). For a
    :class:`~chatwire.commands.Join` the protocol holds further input until
    :meth:`ServerProtocol.moved` or :meth:`ServerProtocol.move_failed`."""

    request: Request


@dataclass(frozen=True, slots=True)
class QuitRequested:
    """The client said ``sair`` or ``/quit``; the goodbye line is already queued."""


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The client closed its side (EOF) after the lines it sent before."""


Event = NameRequested | MessageReceived | CommandRequested | QuitRequested | PeerClosed


# --- states ------------------------------------------------------------------------------


class State(enum.Enum):
    AWAITING_NAME = "awaiting name"
    CLAIMING = "claiming name"  # input is held back until the claim is decided
    CHATTING = "chatting"
    MOVING = "changing rooms"  # input is held back until the move is done
    CLOSED = "closed"


# Every allowed transition, in one place: (from, trigger) -> to.
_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.AWAITING_NAME, "name"): State.CLAIMING,
    (State.CLAIMING, "accept"): State.CHATTING,
    (State.CLAIMING, "reject"): State.AWAITING_NAME,
    (State.CHATTING, "move"): State.MOVING,
    (State.MOVING, "moved"): State.CHATTING,
    **{(s, "close"): State.CLOSED for s in State},
}

_READING = frozenset({State.AWAITING_NAME, State.CHATTING})


class ServerProtocol:
    """One client connection's protocol state. Not thread-safe; one per connection."""

    __slots__ = (
        "_counts",
        "_drained",
        "_eof",
        "_lines",
        "_outbox",
        "_proposed",
        "_state",
        "lines_taken",
        "name",
        "room",
        "room_key",
    )

    def __init__(self, counts: Counts | None = None) -> None:
        """``counts``: where the lines this protocol refuses by itself are counted."""
        self._counts = counts if counts is not None else Counts()
        self._lines = LineBuffer()
        self._state = State.AWAITING_NAME
        self._outbox = bytearray(notice_line(PROMPT))
        self._eof = False
        self._drained = False
        self._proposed: str | None = None
        #: Lines taken from the input so far (what flood control charges for).
        self.lines_taken = 0
        #: The accepted display name, once the claim succeeded.
        self.name: str | None = None
        #: The current room (display form) and its key: the default room from login on.
        self.room = DEFAULT_ROOM
        self.room_key = DEFAULT_ROOM_KEY

    @property
    def state(self) -> State:
        return self._state

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; nothing is parsed until :meth:`events_received`."""
        if self._state is not State.CLOSED and not self._eof:
            self._lines.feed(data)

    def has_input(self) -> bool:
        """Whether input is waiting that :meth:`events_received` would take now."""
        return self._state in _READING and (
            self._lines.has_line() or (self._eof and not self._drained)
        )

    def receive_eof(self) -> None:
        """The client will send nothing more; lines already sent are still honoured."""
        self._eof = True

    def events_received(self, max_lines: int | None = None) -> list[Event]:
        """Parse buffered input into events, as far as the state allows, taking at most
        ``max_lines`` lines (the rest wait in the buffer: flood control paces them).

        While a name claim or a move is pending nothing is parsed: lines wait in the buffer,
        so a user's first message is never handled before the user exists, and a line typed
        after ``/join`` goes to the new room. (The adapter stops reading the socket
        meanwhile, so what waits is at most one read's worth.)
        """
        events: list[Event] = []
        taken = 0
        while self._state in _READING and (max_lines is None or taken < max_lines):
            item = self._lines.next_line()
            if item is None and self._eof and not self._drained:
                self._drained = True
                item = self._lines.finish()
            if item is None:
                if self._eof:
                    self._move("close")
                    events.append(PeerClosed())
                break
            taken += 1
            self._handle(item, events)
        self.lines_taken += taken
        return events

    # -- decisions the gateway takes -----------------------------------------------------

    def accept_name(self, online: int) -> None:
        """The claim succeeded: welcome the user. ``online`` counts them too."""
        self._move("accept")
        self.name = self._proposed
        assert self.name is not None
        self.send_notice(welcome_text(self.name, online))

    def reject_name(self, reason: str) -> None:
        """The claim failed (taken, or the service is unavailable): say why and ask again."""
        self._move("reject")
        self._proposed = None
        self.send_error(reason)
        self.send_notice(PROMPT)

    def moved(self, room: str, key: str, members: int) -> None:
        """The move is done: ``room`` (as it is shown) is the current room now."""
        self._move("moved")
        self.room, self.room_key = room, key
        self.send_notice(in_room_text(room, members))

    def move_failed(self, reason: str = "") -> None:
        """The move did not happen (say why, if ``reason``); the room stays what it was."""
        self._move("moved")
        if reason:
            self.send_error(reason)

    def refuse_line(self, reason: str) -> None:
        """A line that could not be taken (``reason`` says why) is answered as one too long
        is: a ``! `` line, and the prompt again while a name is awaited."""
        if self._state is State.CLOSED:
            return
        self.send_error(reason)
        if self._state is State.AWAITING_NAME:
            self.send_notice(PROMPT)

    def close(self, notice: str | None = None) -> None:
        """Stop reading; queue a last ``* `` line if given (safe to call twice)."""
        if self._state is not State.CLOSED:
            if notice:
                self.send_notice(notice)
            self._move("close")

    # -- output --------------------------------------------------------------------------

    def send_notice(self, text: str) -> None:
        self._outbox += notice_line(text)

    def send_notices(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.send_notice(text)

    def send_error(self, text: str) -> None:
        self._outbox += error_line(text)

    def data_to_send(self) -> bytes:
        """Bytes queued for the client since the last call."""
        data, self._outbox = bytes(self._outbox), bytearray()
        return data

    # -- internals -----------------------------------------------------------------------

    def _move(self, trigger: str) -> None:
        try:
            self._state = _TRANSITIONS[self._state, trigger]
        except KeyError:
            raise LocalProtocolError(f"cannot {trigger} while {self._state.value}") from None

    def _handle(self, item: str | TooLong, events: list[Event]) -> None:
        if isinstance(item, TooLong):
            self._counts.refuse(Refusal.TOO_LONG)
            self.refuse_line(LINE_TOO_LONG_TEXT)
        elif self._state is State.AWAITING_NAME:
            self._handle_name(item, events)
        else:
            self._handle_chat(item, events)

    def _handle_name(self, line: str, events: list[Event]) -> None:
        if _is_quit(line):
            self._quit(events)
            return
        try:
            name = validate_name(line)
        except InvalidName as exc:
            self._counts.refuse(Refusal.INVALID)
            self.send_error(f"invalid name: {exc}")
            self.send_notice(PROMPT)
            return
        self._proposed = name
        self._move("name")
        events.append(NameRequested(name, name_key(name)))

    def _handle_chat(self, line: str, events: list[Event]) -> None:
        # Controls go first, so that an escape sequence cannot hide a command or a blank line.
        text = strip_controls(line)
        word = text.strip()
        if not word:
            return
        if _is_quit(word):
            self._quit(events)
        elif word.startswith("//"):
            events.append(MessageReceived(text.lstrip()[1:]))
        elif word.startswith("/"):
            self._command(word, events)
        else:
            events.append(MessageReceived(text))

    def _command(self, word: str, events: list[Event]) -> None:
        try:
            request = parse_command(word)
        except PeerProtocolError as exc:
            self._counts.refuse(Refusal.INVALID)
            self.send_error(str(exc))
            return
        match request:
            case Help():
                self.send_notices(HELP)
            case Quit():
                self._quit(events)
            case Join(key=key) if key == self.room_key:
                self.send_notice(already_in_text(self.room))
            case Join():
                self._move("move")
                events.append(CommandRequested(request))
            case _:
                events.append(CommandRequested(request))

    def _quit(self, events: list[Event]) -> None:
        self.close(goodbye_text(self.name))
        events.append(QuitRequested())
