"""User and room names: what is allowed, and the key that makes two names "the same".

Names are shown as typed, but identity is decided on a folded key so that ``Alice``,
``ALICE`` and the full-width form of ``Alice`` cannot coexist and impersonate each other.
Room names follow the same rules behind a leading ``#``.
"""

from __future__ import annotations

import unicodedata

from chatwire.errors import InvalidName, InvalidRoom

#: Longest accepted name, in characters (after NFC). Long enough for real names and
#: handles, short enough that ``NAME: `` never dominates a terminal line.
MAX_NAME_CHARS = 32
#: Longest room name after its ``#``, in characters: the same bound as a user name.
MAX_ROOM_CHARS = 32
#: What every room name starts with (as on IRC), so a room is never mistaken for a user.
ROOM_SIGIL = "#"
#: The room every user is in after logging in, and returns to with ``/part``. It always
#: exists; every other room is created by its first member and gone with its last.
DEFAULT_ROOM = "#lobby"

_PUNCTUATION = frozenset("_-.")
_RULE = "use letters, digits, '_', '-' or '.'"


def _allowed(ch: str, first: bool) -> bool:
    if ch in _PUNCTUATION:
        return True
    category = unicodedata.category(ch)
    if category[0] == "L" or category == "Nd":
        return True
    # Combining marks are part of letters in many scripts (Devanagari vowel signs,
    # decomposed accents); they cannot stand alone at the start.
    return category[0] == "M" and not first


def _shown(ch: str) -> str:
    return ch if ch.isprintable() and not ch.isspace() else f"U+{ord(ch):04X}"


def _first_disallowed(text: str) -> str | None:
    for index, ch in enumerate(text):
        if not _allowed(ch, index == 0):
            return ch
    return None


def validate_name(raw: str) -> str:
    """Return the display form of ``raw``, or raise :class:`InvalidName` saying why.

    Surrounding white space is forgiven (telnet users type it); everything else must be
    letters of any script, digits, ``_``, ``-`` or ``.``.
    """
    name = unicodedata.normalize("NFC", raw.strip())
    if not name:
        raise InvalidName("a name is required")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidName(f"a name has at most {MAX_NAME_CHARS} characters")
    if (ch := _first_disallowed(name)) is not None:
        raise InvalidName(f"{_shown(ch)!r} is not allowed: {_RULE}")
    return name


def name_key(name: str) -> str:
    """The identity of a name: NFKC case folding, as Unicode recommends for identifiers."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def validate_room(raw: str) -> str:
    """Return the display form of room name ``raw`` (``#`` and 1 to 32 name characters),
    or raise :class:`InvalidRoom` saying why."""
    room = unicodedata.normalize("NFC", raw.strip())
    if not room.startswith(ROOM_SIGIL):
        raise InvalidRoom(f"a room name starts with {ROOM_SIGIL}, as in {DEFAULT_ROOM}")
    body = room[len(ROOM_SIGIL) :]
    if not body:
        raise InvalidRoom(f"a room name has 1 to {MAX_ROOM_CHARS} characters after {ROOM_SIGIL}")
    if len(body) > MAX_ROOM_CHARS:
        raise InvalidRoom(f"a room name has at most {MAX_ROOM_CHARS} characters after #")
    if (ch := _first_disallowed(body)) is not None:
        raise InvalidRoom(f"{_shown(ch)!r} is not allowed in a room name: {_RULE}")
    return room


def room_key(room: str) -> str:
    """The identity of a room name, folded as names are: ``#Math``, ``#MATH`` and its full-width
    form are one."""
    return name_key(room)


DEFAULT_ROOM_KEY = room_key(DEFAULT_ROOM)
