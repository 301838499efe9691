"""User names: what is allowed, and the key that makes two names "the same".

Names are shown as typed, but uniqueness is decided on a folded key so that ``Alice``,
``ALICE`` and the full-width form of ``Alice`` cannot coexist and impersonate each other.
"""

from __future__ import annotations

import unicodedata

from gateway.errors import InvalidName

#: Longest accepted name, in characters (after NFC). Long enough for real names and
#: handles, short enough that ``NAME: `` never dominates a terminal line.
MAX_NAME_CHARS = 32

_PUNCTUATION = frozenset("_-.")


def _allowed(ch: str, first: bool) -> bool:
    if ch in _PUNCTUATION:
        return True
    category = unicodedata.category(ch)
    if category[0] == "L" or category == "Nd":
        return True
    # Combining marks are part of letters in many scripts (Devanagari vowel signs,
    # decomposed accents); they cannot stand alone at the start.
    return category[0] == "M" and not first


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
    for index, ch in enumerate(name):
        if not _allowed(ch, index == 0):
            shown = ch if ch.isprintable() and not ch.isspace() else f"U+{ord(ch):04X}"
            raise InvalidName(f"{shown!r} is not allowed: use letters, digits, '_', '-' or '.'")
    return name


def name_key(name: str) -> str:
    """The identity of a name: NFKC case folding, as Unicode recommends for identifiers."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
