"""The chat line protocol, server side, as a pure state machine: bytes in, events out.

Nothing here touches a socket or an event loop. The asyncio adapter (:mod:`gateway.session`)
feeds received bytes to :meth:`ServerProtocol.receive_data`, acts on the events from
:meth:`ServerProtocol.events_received` (claim a name, publish a message, ...) and writes
:meth:`ServerProtocol.data_to_send` to the transport. Everything the protocol can answer on
its own (bad names, over-long lines, unknown commands, ``/help``) it answers on its own.

The wire format is written down in PROTOCOL.md; the strings that make it are all here.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.errors import InvalidName, LocalProtocolError
from gateway.lines import MAX_LINE_BYTES, LineBuffer, TooLong, strip_controls
from gateway.names import name_key, validate_name

# --- what the server says ----------------------------------------------------------------

PROMPT = "Choose a name:"
QUIT_WORDS = frozenset({"sair", "/quit"})
#: Most messages one /history may ask for; the stream keeps more, a screen shows fewer.
MAX_HISTORY = 100

HELP = (
    "Commands:",
    "  /who          list everyone online",
    f"  /history [N]  the last N messages (1 to {MAX_HISTORY})",
    "  /help         this help",
    "  /quit         leave the chat (sair works too)",
    "  //text        send a message that starts with '/'",
)
SERVICE_DOWN_TEXT = (
    "The message service is unavailable: nothing you send is delivered until it is back."
)
SERVICE_BACK_TEXT = "The message service is back."


def slow_down_text(rate: float) -> str:
    return f"slow down: at most {rate:g} lines a second; lines over the limit are not sent"


FLOODING_TEXT = "disconnected for flooding"
RESTART_TEXT = "Server restarting: please reconnect."
UNAVAILABLE_TEXT = "the chat service is unavailable right now; try again in a moment"
NOT_DELIVERED_TEXT = "not delivered: the chat service is unavailable; try again"
WHO_UNAVAILABLE_TEXT = "the user list is unavailable right now; try again"
NAME_LOST_TEXT = "your name was taken while the service was interrupted"
NO_HISTORY_TEXT = "No messages to show."


def name_taken_text(name: str) -> str:
    return f"the name {name} is taken; choose another"


SERVER_FULL_TEXT = "this server is full; try again later"
TOO_MANY_FROM_ADDRESS_TEXT = "too many connections from your address"


def chat_line(name: str, text: str) -> bytes:
    """A room message as every recipient sees it: ``NAME: TEXT``."""
    return f"{name}: {text}\n".encode()


def notice_line(text: str) -> bytes:
    """A system line (``* ``): joins, leaves, welcomes, lists."""
    return f"* {text}\n".encode()


def error_line(text: str) -> bytes:
    """An error line (``! ``): what the client sent was refused; the connection stays open."""
    return f"! {text}\n".encode()


def joined_text(name: str) -> str:
    return f"{name} joined the chat"


def left_text(name: str) -> str:
    return f"{name} left the chat"


def welcome_text(name: str, online: int) -> str:
    people = "1 user" if online == 1 else f"{online} users"
    return f"Welcome, {name}! {people} online. Type /help for commands, sair or /quit to leave."


def announcement_text(text: str) -> str:
    return f"[admin] {text}"


def kicked_text(reason: str) -> str:
    return f"removed by an operator: {reason}" if reason else "removed by an operator"


def goodbye_text(name: str | None) -> str:
    return f"Goodbye, {name}!" if name else "Goodbye!"


def history_text(name: str, text: str, timestamp: float) -> str:
    """A past message, marked so that it cannot pass for a live one."""
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(timestamp))
    return f"[history {when} UTC] {name}: {text}"


def who_texts(names: Iterable[str]) -> list[str]:
    """The ``/who`` answer: a count, then one line per user, sorted as people read lists."""
    ordered = sorted(names, key=lambda n: (n.casefold(), n))
    people = "1 user" if len(ordered) == 1 else f"{len(ordered)} users"
    return [f"{people} online:", *(f"  {name}" for name in ordered)]


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
    """A chat line to relay to the room, control characters already removed."""

    text: str


@dataclass(frozen=True, slots=True)
class WhoRequested:
    """The client asked for the list of online users."""


@dataclass(frozen=True, slots=True)
class HistoryRequested:
    """The client asked for the last ``count`` messages (None: the gateway's default)."""

    count: int | None


@dataclass(frozen=True, slots=True)
class QuitRequested:
    """The client said ``sair`` or ``/quit``; the goodbye line is already queued."""


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The client closed its side (EOF) after the lines it sent before."""


Event = (
    NameRequested | MessageReceived | WhoRequested | HistoryRequested | QuitRequested | PeerClosed
)


# --- states ------------------------------------------------------------------------------


class State(enum.Enum):
    AWAITING_NAME = "awaiting name"
    CLAIMING = "claiming name"  # input is held back until the claim is decided
    CHATTING = "chatting"
    CLOSED = "closed"


# Every allowed transition, in one place: (from, trigger) -> to.
_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.AWAITING_NAME, "name"): State.CLAIMING,
    (State.CLAIMING, "accept"): State.CHATTING,
    (State.CLAIMING, "reject"): State.AWAITING_NAME,
    **{(s, "close"): State.CLOSED for s in State},
}

_READING = frozenset({State.AWAITING_NAME, State.CHATTING})


class ServerProtocol:
    """One client connection's protocol state. Not thread-safe; one per connection."""

    __slots__ = ("_drained", "_eof", "_lines", "_outbox", "_proposed", "_state", "name")

    def __init__(self) -> None:
        self._lines = LineBuffer()
        self._state = State.AWAITING_NAME
        self._outbox = bytearray(notice_line(PROMPT))
        self._eof = False
        self._drained = False
        self._proposed: str | None = None
        #: The accepted display name, once the claim succeeded.
        self.name: str | None = None

    @property
    def state(self) -> State:
        return self._state

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; nothing is parsed until :meth:`events_received`."""
        if self._state is not State.CLOSED and not self._eof:
            self._lines.feed(data)

    def receive_eof(self) -> None:
        """The client will send nothing more; lines already sent are still honoured."""
        self._eof = True

    def events_received(self) -> list[Event]:
        """Parse buffered input into events, as far as the state allows.

        While a name claim is pending nothing is parsed: lines wait in the buffer, so the
        first message of a user is never handled before the user exists. (The adapter stops
        reading the socket meanwhile, so what waits is at most one read's worth.)
        """
        events: list[Event] = []
        while self._state in _READING:
            item = self._lines.next_line()
            if item is None and self._eof and not self._drained:
                self._drained = True
                item = self._lines.finish()
            if item is None:
                if self._eof:
                    self._move("close")
                    events.append(PeerClosed())
                break
            self._handle(item, events)
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
            self.send_error(f"line too long: at most {MAX_LINE_BYTES} bytes; it was not sent")
            if self._state is State.AWAITING_NAME:
                self.send_notice(PROMPT)
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
        command, _, argument = word.partition(" ")
        command = command.lower()
        if command == "/quit":
            self._quit(events)
        elif command == "/who":
            events.append(WhoRequested())
        elif command == "/history":
            self._history(argument.strip(), events)
        elif command == "/help":
            self.send_notices(HELP)
        else:
            self.send_error(f"unknown command {command[:64]}; type /help for the list")

    def _history(self, argument: str, events: list[Event]) -> None:
        if not argument:
            events.append(HistoryRequested(None))
        elif argument.isdecimal() and 1 <= int(argument) <= MAX_HISTORY:
            events.append(HistoryRequested(int(argument)))
        else:
            self.send_error(f"usage: /history [N], N from 1 to {MAX_HISTORY}")

    def _quit(self, events: list[Event]) -> None:
        self.close(goodbye_text(self.name))
        events.append(QuitRequested())
