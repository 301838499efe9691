"""The command table: every ``/command`` a user can type, its arguments, its help line, and
the request it becomes.

Parsing is pure: :func:`parse_command` turns a command line into a request (a frozen
dataclass) or raises a :class:`~chatwire.errors.PeerProtocolError` whose text is the whole
answer. ``/help`` is derived from the table. A new command is one row here, one request
class, and one handler where the request is served (the gateway's ``commands`` module, whose
dispatch is exhaustive: mypy names a request nobody handles).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chatwire.errors import InvalidName, InvalidRoom, UsageError
from chatwire.names import DEFAULT_ROOM, name_key, room_key, validate_name, validate_room
from chatwire.texts import MAX_HISTORY, not_online_text, unknown_command_text

# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Who:
    """List the members of the current room."""


@dataclass(frozen=True, slots=True)
class Rooms:
    """List every room that has members."""


@dataclass(frozen=True, slots=True)
class History:
    """The last ``count`` messages of the current room (None: the gateway's default)."""

    count: int | None


@dataclass(frozen=True, slots=True)
class Join:
    """Move to ``room`` (display form as typed; ``key`` is its identity)."""

    room: str
    key: str


@dataclass(frozen=True, slots=True)
class PrivateMessage:
    """Say ``text`` to the user whose folded name is ``key``, and to nobody else."""

    name: str
    key: str
    text: str


@dataclass(frozen=True, slots=True)
class Help:
    """List the commands."""


@dataclass(frozen=True, slots=True)
class Quit:
    """Leave the chat."""


Request = Who | Rooms | History | Join | PrivateMessage | Help | Quit


# --- argument parsers -----------------------------------------------------------------------


def _no_argument(request: Request) -> Callable[[str], Request]:
    return lambda _argument: request


def _history(argument: str) -> Request:
    if not argument:
        return History(None)
    if argument.isdecimal() and 1 <= int(argument) <= MAX_HISTORY:
        return History(int(argument))
    raise UsageError(f"usage: /history [N], N from 1 to {MAX_HISTORY}")


def _join(argument: str) -> Request:
    if not argument:
        raise UsageError("usage: /join #ROOM")
    try:
        room = validate_room(argument)
    except InvalidRoom as exc:
        raise InvalidRoom(f"invalid room name: {exc}") from None
    return Join(room, room_key(room))


def _part(_argument: str) -> Request:
    return Join(DEFAULT_ROOM, room_key(DEFAULT_ROOM))


def _msg(argument: str) -> Request:
    target, _, text = argument.partition(" ")
    text = text.strip()
    if not target or not text:
        raise UsageError("usage: /msg NAME TEXT")
    try:
        name = validate_name(target)
    except InvalidName:
        raise UsageError(not_online_text(target[:64])) from None
    return PrivateMessage(name, name_key(name), text)


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """One row of the table: what the user types, what it does, how its argument parses."""

    name: str
    usage: str
    help: str
    parse: Callable[[str], Request]


COMMANDS: tuple[Command, ...] = (
    Command("/who", "/who", "list the users in your room", _no_argument(Who())),
    Command("/rooms", "/rooms", "list the rooms that have users", _no_argument(Rooms())),
    Command("/join", "/join #ROOM", "move to #ROOM (made when new)", _join),
    Command("/part", "/part", f"go back to {DEFAULT_ROOM}", _part),
    Command("/msg", "/msg NAME TEXT", "say TEXT to NAME alone", _msg),
    Command("/history", "/history [N]", f"the last N messages (1 to {MAX_HISTORY})", _history),
    Command("/help", "/help", "this help", _no_argument(Help())),
    Command("/quit", "/quit", "leave the chat (sair works too)", _no_argument(Quit())),
)

BY_NAME: dict[str, Command] = {command.name: command for command in COMMANDS}

#: The column the help lines align to: the longest usage, plus two spaces.
_WIDTH = max(len(c.usage) for c in COMMANDS) + 2

HELP: tuple[str, ...] = (
    "Commands:",
    *(f"  {c.usage.ljust(_WIDTH)}{c.help}" for c in COMMANDS),
    f"  {'//text'.ljust(_WIDTH)}send a message that starts with '/'",
)


def parse_command(line: str) -> Request:
    """The request a command line (``/name argument...``) makes, or a
    :class:`~chatwire.errors.PeerProtocolError` whose text answers it."""
    name, _, argument = line.strip().partition(" ")
    command = BY_NAME.get(name.lower())
    if command is None:
        raise UsageError(unknown_command_text(name.lower()))
    return command.parse(argument.strip())
