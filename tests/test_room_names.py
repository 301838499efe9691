"""Room names: which names validate_room allows, when room_key makes two rooms one, and
how /join's argument parses."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatwire.commands import Join, parse_command
from chatwire.errors import InvalidRoom, PeerProtocolError
from chatwire.names import (
    DEFAULT_ROOM,
    DEFAULT_ROOM_KEY,
    MAX_ROOM_CHARS,
    room_key,
    validate_room,
)

#: Characters a room name may hold after its '#': letters of several scripts, digits, _-.
ALLOWED = st.sampled_from([*"abcXYZ_-.0123456789éñßΔδжЖ山田मह", "ǅ"])
#: Characters that are never allowed in a room name.
FORBIDDEN = st.sampled_from([*" \t*:!?/@{}()[]#,;'\"\\<>|~`$%^&+=", "\u200b", "\u00a0"])


@given(st.lists(ALLOWED, min_size=1, max_size=MAX_ROOM_CHARS).map("".join))
def test_a_valid_name_is_accepted_as_typed_in_nfc(body: str) -> None:
    """'#' and 1 to 32 letters, digits, '_', '-', '.' come back in NFC, as typed."""
    room = "#" + body
    assert validate_room(room) == unicodedata.normalize("NFC", room)


@given(st.lists(ALLOWED, min_size=1, max_size=MAX_ROOM_CHARS).map("".join))
def test_case_and_width_variants_are_one_room(body: str) -> None:
    """Upper case, lower case and the full-width form of a name have one key."""
    room = validate_room("#" + body)
    width = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" and c != "#" else c for c in room)
    variants = [room.upper(), room.lower(), room.casefold(), width]
    keys = {room_key(v) for v in variants if _valid(v)}
    assert keys <= {room_key(room)}
    assert room_key(room_key(room)) == room_key(room)


@given(
    st.lists(ALLOWED, max_size=10).map("".join),
    FORBIDDEN,
    st.lists(ALLOWED, max_size=10).map("".join),
)
def test_a_forbidden_character_anywhere_is_refused(before: str, bad: str, after: str) -> None:
    """A name with a character outside the rules is refused, whatever surrounds it."""
    candidate = f"#{before}{bad}{after}"
    if candidate.strip() != candidate:
        candidate = f"#{before}{bad}x{after}"  # keep the bad character inside the name
    with pytest.raises(InvalidRoom):
        validate_room(candidate)


@given(st.lists(ALLOWED, min_size=MAX_ROOM_CHARS + 1, max_size=MAX_ROOM_CHARS + 20).map("".join))
def test_names_longer_than_the_limit_are_refused(body: str) -> None:
    """More than 32 characters after '#' is refused (after NFC)."""
    if len(unicodedata.normalize("NFC", body)) > MAX_ROOM_CHARS:
        with pytest.raises(InvalidRoom, match="at most 32"):
            validate_room("#" + body)


@pytest.mark.parametrize("raw", ["math", "", "#", "  #  ", "##math", "#\u0301a"])
def test_malformed_names_are_refused_with_a_reason(raw: str) -> None:
    """No '#', nothing after it, a second '#', or a combining mark first: refused."""
    with pytest.raises(InvalidRoom) as info:
        validate_room(raw)
    assert str(info.value)


def test_surrounding_white_space_is_forgiven() -> None:
    """White space around the name is removed, as for user names."""
    assert validate_room("  #math\t") == "#math"


def test_the_default_room_is_valid_and_its_own_key() -> None:
    """#lobby is a valid name and already folded."""
    assert validate_room(DEFAULT_ROOM) == DEFAULT_ROOM
    assert room_key(DEFAULT_ROOM) == DEFAULT_ROOM_KEY


@pytest.mark.parametrize(
    ("line", "room", "key"),
    [
        ("/join #Math", "#Math", "#math"),
        ("/JOIN   #\uff2d\uff21\uff34\uff28 ", "#\uff2d\uff21\uff34\uff28", "#math"),
    ],
)
def test_join_parses_to_the_room_and_its_key(line: str, room: str, key: str) -> None:
    """/join's argument becomes the room as typed and its folded key."""
    assert parse_command(line) == Join(room, key)


@pytest.mark.parametrize("line", ["/join", "/join math", "/join #a b", "/join #x*y"])
def test_join_with_a_bad_argument_answers_with_the_reason(line: str) -> None:
    """A missing or invalid room is a peer error whose text is the whole answer."""
    with pytest.raises(PeerProtocolError) as info:
        parse_command(line)
    assert str(info.value).startswith(("usage: /join", "invalid room name: "))


def test_part_is_a_join_of_the_default_room() -> None:
    """/part takes the user back to #lobby."""
    assert parse_command("/part") == Join(DEFAULT_ROOM, DEFAULT_ROOM_KEY)


def _valid(room: str) -> bool:
    try:
        validate_room(room)
    except InvalidRoom:
        return False
    return True
