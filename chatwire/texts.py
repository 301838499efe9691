"""Everything the server says, in one place: each text as a function that makes it and,
where a client must recognise it, the function that parses it back.

Lines come in three shapes (PROTOCOL.md): ``NAME: TEXT`` (a chat message), ``* TEXT`` (a
notice) and ``! TEXT`` (an error); private messages add ``(private) NAME: TEXT`` and
``(private to NAME) SENDER: TEXT``. No user text can start a line with ``(``, ``* `` or
``! ``: it always follows a name, and names hold none of those characters.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from chatwire.lines import MAX_LINE_BYTES

PROMPT = "Choose a name:"
QUIT_WORDS = frozenset({"sair", "/quit"})
#: Most messages one /history may ask for; the stream keeps more, a screen shows fewer.
MAX_HISTORY = 100

NOTICE_PREFIX = "* "
ERROR_PREFIX = "! "
PRIVATE_PREFIX = "(private) "
PRIVATE_TO_PREFIX = "(private to "

SERVICE_DOWN_TEXT = (
    "The message service is unavailable: nothing you send is delivered until it is back."
)
SERVICE_BACK_TEXT = "The message service is back."
RESTART_TEXT = "Server restarting: please reconnect."
UNAVAILABLE_TEXT = "the chat service is unavailable right now; try again in a moment"
NOT_DELIVERED_TEXT = "not delivered: the chat service is unavailable; try again"
WHO_UNAVAILABLE_TEXT = "the user list is unavailable right now; try again"
ROOMS_UNAVAILABLE_TEXT = "the room list is unavailable right now; try again"
MOVE_UNAVAILABLE_TEXT = "could not change rooms: the chat service is unavailable; try again"
NAME_LOST_TEXT = "your name was taken while the service was interrupted"
NO_HISTORY_TEXT = "No messages to show."
SERVER_FULL_TEXT = "this server is full; try again later"
TOO_MANY_FROM_ADDRESS_TEXT = "too many connections from your address"
INTERNAL_ERROR_TEXT = "internal error; closing the connection"
LINE_TOO_LONG_TEXT = f"line too long: at most {MAX_LINE_BYTES} bytes; it was not sent"
#: A WebSocket text frame carries one line (PROTOCOL.md, "WebSocket").
FRAME_LINE_BREAK_TEXT = "one line per frame: this frame has a line break inside; it was not sent"


# --- line shapes ----------------------------------------------------------------------------


#: Between the sender's name and the text in a chat line (names hold no ``:``).
CHAT_SEPARATOR = ": "


def chat_line(name: str, text: str) -> bytes:
    """A room message as every recipient sees it: ``NAME: TEXT``."""
    return f"{name}{CHAT_SEPARATOR}{text}\n".encode()


def notice_line(text: str) -> bytes:
    """A system line (``* ``): joins, leaves, welcomes, lists."""
    return f"{NOTICE_PREFIX}{text}\n".encode()


def error_line(text: str) -> bytes:
    """An error line (``! ``): what the client sent was refused; the connection stays open."""
    return f"{ERROR_PREFIX}{text}\n".encode()


def private_line(sender: str, text: str) -> bytes:
    """A private message as its recipient sees it."""
    return f"{PRIVATE_PREFIX}{sender}: {text}\n".encode()


def private_echo_line(recipient: str, sender: str, text: str) -> bytes:
    """A private message as its sender sees it."""
    return f"{PRIVATE_TO_PREFIX}{recipient}) {sender}: {text}\n".encode()


@dataclass(frozen=True, slots=True)
class Private:
    """A parsed private line: ``to`` is None for one received, the recipient for an echo."""

    sender: str
    text: str
    to: str | None = None


_PRIVATE = re.compile(r"^\(private\) (?P<sender>[^\s:]+): (?P<text>.*)$", re.S)
_PRIVATE_TO = re.compile(
    r"^\(private to (?P<to>[^\s:)]+)\) (?P<sender>[^\s:]+): (?P<text>.*)$", re.S
)


def parse_private(line: str) -> Private | None:
    if m := _PRIVATE.match(line):
        return Private(m["sender"], m["text"])
    if m := _PRIVATE_TO.match(line):
        return Private(m["sender"], m["text"], m["to"])
    return None


# --- notices --------------------------------------------------------------------------------


def _people(count: int) -> str:
    return "1 user" if count == 1 else f"{count} users"


def welcome_text(name: str, online: int) -> str:
    return (
        f"Welcome, {name}! {_people(online)} online. "
        "Type /help for commands, sair or /quit to leave."
    )


_WELCOME = re.compile(r"^Welcome, (?P<name>.+?)! (?P<online>\d+) users? online\.")


def parse_welcome(text: str) -> tuple[str, int] | None:
    """(name, users online) from a welcome notice's text."""
    m = _WELCOME.match(text)
    return (m["name"], int(m["online"])) if m else None


def joined_text(name: str) -> str:
    return f"{name} joined the chat"


def left_text(name: str) -> str:
    return f"{name} left the chat"


def moved_in_text(name: str, room: str) -> str:
    """What a room's members see when ``name`` moves in."""
    return f"{name} joined {room}"


def moved_out_text(name: str, room: str) -> str:
    """What a room's members see when ``name`` moves on to ``room``."""
    return f"{name} left for {room}"


def in_room_text(room: str, members: int) -> str:
    """What the mover sees on arriving in ``room``; ``members`` counts the mover too."""
    return f"You are in {room} now: {_people(members)} here."


_IN_ROOM = re.compile(r"^You are in (?P<room>#\S+) now: (?P<count>\d+) users? here\.$")


def parse_in_room(text: str) -> tuple[str, int] | None:
    """(room, members) from the notice a mover gets."""
    m = _IN_ROOM.match(text)
    return (m["room"], int(m["count"])) if m else None


def slow_down_text(rate: float) -> str:
    """The notice a client gets when it sends faster than its rate: nothing is lost."""
    return f"Slow down: at most {rate:g} lines a second; your next lines follow at that pace."


def already_in_text(room: str) -> str:
    return f"You are already in {room}."


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


def _sorted_names(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: (n.casefold(), n))


def who_texts(names: Iterable[str], room: str | None = None) -> list[str]:
    """The ``/who`` answer: a count, then one line per user, sorted as people read lists.

    ``room`` None: the list is everyone online (the default room while no other is in use),
    answered exactly as before rooms existed."""
    ordered = _sorted_names(names)
    where = "online" if room is None else f"in {room}"
    return [f"{_people(len(ordered))} {where}:", *(f"  {name}" for name in ordered)]


_USERS_HEADER = re.compile(r"^\d+ users? (online|in #\S+):$")


def is_who_header(text: str) -> bool:
    return bool(_USERS_HEADER.match(text))


def rooms_texts(rooms: Iterable[tuple[str, int]]) -> list[str]:
    """The ``/rooms`` answer: a count, then one line per room with its members."""
    ordered = sorted(rooms, key=lambda r: (r[0].casefold(), r[0]))
    count = "1 room" if len(ordered) == 1 else f"{len(ordered)} rooms"
    return [f"{count}:", *(f"  {room}: {_people(n)}" for room, n in ordered)]


_ROOMS_HEADER = re.compile(r"^\d+ rooms?:$")


def is_rooms_header(text: str) -> bool:
    return bool(_ROOMS_HEADER.match(text))


def summary_text(names: list[str], what: str, shown: int = 5) -> str:
    """Several joins or leaves in one line: ``what`` is the phrase after the name(s), as in
    ``joined the chat`` or ``left for #math``."""
    if len(names) == 1:
        return f"{names[0]} {what}"
    listed = ", ".join(names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} users {what}: {listed}{more}"


# --- errors ---------------------------------------------------------------------------------


def name_taken_text(name: str) -> str:
    return f"the name {name} is taken; choose another"


def not_online_text(name: str) -> str:
    return f"no user named {name} is online"


def unknown_command_text(command: str) -> str:
    return f"unknown command {command[:64]}; type /help for the list"
