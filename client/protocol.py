"""The chat line protocol, client side, as a pure state machine: bytes in, events out.

It frames what the server sends into lines, tells chat lines, notices and errors apart,
and follows the login (prompt, name, welcome or refusal) so the I/O layer only reacts.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from chatwire.errors import LocalProtocolError
from chatwire.lines import MAX_LINE_BYTES, LineBuffer, TooLong, strip_controls
from chatwire.names import DEFAULT_ROOM
from chatwire.texts import (
    PROMPT,
    QUIT_WORDS,
    is_rooms_header,
    is_who_header,
    notice_line,
    parse_in_room,
    parse_private,
    parse_welcome,
)

#: Longest server line accepted: a chat line is a name, ": " and a client line of at most
#: MAX_LINE_BYTES; twice that leaves room for any prefix while still bounding memory.
MAX_SERVER_LINE_BYTES = 2 * MAX_LINE_BYTES

PROMPT_LINE = notice_line(PROMPT).decode().rstrip("\n")
#: Commands the server answers later (through Redis), and the kind of answer each gets:
#: what a pipe waits for before it quits.
_ANSWERED = {"/who": "who", "/rooms": "rooms", "/msg": "pm"}
#: Error lines that refuse a line, by how they start, and the kinds of line they refuse
#: (the oldest line of those kinds still waiting is the one refused).
_REFUSALS = (
    ("line too long", ("long",)),
    ("not delivered", ("msg", "pm")),
    ("no user named ", ("pm",)),
    ("usage: /msg", ("pm",)),
    ("the user list is", ("who",)),
    ("the room list is", ("rooms",)),
)


class Kind(enum.Enum):
    CHAT = "chat"  # NAME: TEXT
    PRIVATE = "private"  # (private) NAME: TEXT, or (private to NAME) ME: TEXT
    NOTICE = "notice"  # * TEXT
    ERROR = "error"  # ! TEXT


@dataclass(frozen=True, slots=True)
class ServerLine:
    """One line from the server, classified. ``name`` is the sender of a chat or private
    line; ``to`` the recipient of a private line this user sent."""

    raw: str
    kind: Kind
    text: str
    name: str | None = None
    to: str | None = None


def classify(raw: str) -> ServerLine:
    if raw.startswith("* "):
        return ServerLine(raw, Kind.NOTICE, raw[2:])
    if raw.startswith("! "):
        return ServerLine(raw, Kind.ERROR, raw[2:])
    if raw.startswith("(") and (private := parse_private(raw)) is not None:
        return ServerLine(raw, Kind.PRIVATE, private.text, private.sender, private.to)
    name, sep, text = raw.partition(": ")
    if sep and name and " " not in name:
        return ServerLine(raw, Kind.CHAT, text, name)
    return ServerLine(raw, Kind.NOTICE, raw)  # not ours to judge: show it as it came


def is_quit(line: str) -> bool:
    """Whether the gateway will take ``line`` as leaving (same rules as the server)."""
    words = strip_controls(line).split()
    return bool(words) and (" ".join(words).lower() in QUIT_WORDS or words[0].lower() == "/quit")


def answer_kind(line: str) -> str | None:
    """What the server will answer ``line`` with, if a pipe must wait for it: "msg" (the
    echo of a message), "who" or "rooms" (a list), "pm" (a private message's echo),
    "long" (the refusal of an over-long line); None if nothing is owed."""
    word = strip_controls(line).strip()
    if not word:
        return None  # ignored
    if len(line.encode()) > MAX_LINE_BYTES:
        return "long"
    if word.startswith("/") and not word.startswith("//"):
        return _ANSWERED.get(word.split(maxsplit=1)[0].lower())
    return "msg"


def expects_answer(line: str) -> bool:
    """Whether the server owes ``line`` an answer (an echo, a list, or a refusal) that a
    pipe must wait for before quitting."""
    return answer_kind(line) is not None


def _one_line(line: str) -> str:
    # One line per call: a stray newline would be a second message.
    return line.replace("\r", " ").replace("\n", " ")


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prompted:
    """The server asks for a name."""

    line: ServerLine


@dataclass(frozen=True, slots=True)
class Welcomed:
    """The name was accepted."""

    name: str
    online: int
    line: ServerLine


@dataclass(frozen=True, slots=True)
class NameRefused:
    """The name was refused; ``line.text`` is the server's reason."""

    line: ServerLine


@dataclass(frozen=True, slots=True)
class Received:
    """Any other line from the server."""

    line: ServerLine


@dataclass(frozen=True, slots=True)
class Closed:
    """The server closed the connection."""


Event = Prompted | Welcomed | NameRefused | Received | Closed


class State(enum.Enum):
    CONNECTED = "connected"  # waiting for the prompt
    NAMING = "naming"  # prompted; our name not sent yet
    CLAIMING = "claiming"  # name sent; waiting for the verdict
    CHATTING = "chatting"
    CLOSED = "closed"


class ClientProtocol:
    """One connection's client-side protocol state."""

    __slots__ = ("_lines", "_outbox", "_owed", "_state", "name", "refused", "room")

    def __init__(self) -> None:
        self._lines = LineBuffer(MAX_SERVER_LINE_BYTES)
        self._state = State.CONNECTED
        self._outbox = bytearray()
        self.name: str | None = None
        #: The room this user is in, as the server last said.
        self.room = DEFAULT_ROOM
        #: Lines sent that the server owes an answer, oldest first: (kind, line).
        self._owed: deque[tuple[str, str]] = deque()
        #: Lines the server refused, with its reason, in the order refused.
        self.refused: list[tuple[str, str]] = []

    @property
    def state(self) -> State:
        return self._state

    @property
    def answers_due(self) -> int:
        """Lines sent that the server has not answered yet."""
        return len(self._owed)

    def owed(self) -> list[str]:
        """The lines sent that the server has not answered yet, oldest first."""
        return [line for _, line in self._owed]

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the server; return the events they complete."""
        self._lines.feed(data)
        events: list[Event] = []
        while (item := self._lines.next_line()) is not None:
            if not isinstance(item, TooLong):  # a broken server; skip what cannot be shown
                events.append(self._interpret(item))
        return events

    def receive_eof(self) -> list[Event]:
        events: list[Event] = []
        last = self._lines.finish()
        if isinstance(last, str):
            events.append(self._interpret(last))
        self._state = State.CLOSED
        events.append(Closed())
        return events

    def send_name(self, name: str) -> None:
        if self._state is not State.NAMING:
            raise LocalProtocolError(f"cannot send a name while {self._state.value}")
        self._state = State.CLAIMING
        self._write(name)

    def send_line(self, line: str) -> None:
        """Send a chat line or command; counts what the server will answer later."""
        if self._state is not State.CHATTING:
            raise LocalProtocolError(f"cannot chat while {self._state.value}")
        line = _one_line(line)
        if (kind := answer_kind(line)) is not None:
            self._owed.append((kind, line))
        self._write(line)

    def data_to_send(self) -> bytes:
        data, self._outbox = bytes(self._outbox), bytearray()
        return data

    def _write(self, line: str) -> None:
        self._outbox += _one_line(line).encode() + b"\n"

    def _interpret(self, raw: str) -> Event:
        line = classify(raw)
        if raw == PROMPT_LINE and self._state in (State.CONNECTED, State.CLAIMING):
            self._state = State.NAMING
            return Prompted(line)
        if self._state is State.CLAIMING:
            if line.kind is Kind.ERROR:
                return NameRefused(line)
            if line.kind is Kind.NOTICE and (welcome := parse_welcome(line.text)):
                self._state = State.CHATTING
                self.name, online = welcome
                self.room = DEFAULT_ROOM
                return Welcomed(self.name, online, line)
        if line.kind is Kind.NOTICE and (moved := parse_in_room(line.text)):
            self.room = moved[0]
        if self._state is State.CHATTING and self._owed:
            self._settle(line)
        return Received(line)

    def _settle(self, line: ServerLine) -> None:
        """Strike off the line that ``line`` answers, if it answers one."""
        match line.kind:
            case Kind.ERROR:
                for start, kinds in _REFUSALS:
                    if line.text.startswith(start):
                        if (owed := self._pop(kinds)) is not None:
                            self.refused.append((owed, line.text))
                        return
            case Kind.CHAT if line.name == self.name:
                self._pop(("msg",))
            case Kind.PRIVATE if line.to is not None and line.name == self.name:
                self._pop(("pm",))
            case Kind.NOTICE if is_who_header(line.text):
                self._pop(("who",))
            case Kind.NOTICE if is_rooms_header(line.text):
                self._pop(("rooms",))

    def _pop(self, kinds: tuple[str, ...]) -> str | None:
        """Remove and return the oldest owed line of one of ``kinds``."""
        for index, (kind, line) in enumerate(self._owed):
            if kind in kinds:
                del self._owed[index]
                return line
        return None
