"""User names: which names validate_name allows, and when name_key makes two names equal."""

from __future__ import annotations

import unicodedata

import pytest

from chatwire.errors import InvalidName, PeerProtocolError
from chatwire.names import MAX_NAME_CHARS, name_key, validate_name

# --- accepted -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "alice",
        "José",
        "Łukasz",
        "Δημήτρης",
        "山田",
        "मोहन",  # Devanagari: letters with combining vowel signs
        "Ñandú",
        "Ольга",
        "user_42",
        "a-b.c",
        "42",
        "_",
        ".",
        "-",
    ],
)
def test_letters_of_any_script_digits_and_punctuation_accepted(name: str) -> None:
    """Letters of any script, digits and _ - . are accepted and returned as typed."""
    assert validate_name(name) == name


def test_devanagari_combining_marks_are_part_of_the_name() -> None:
    """A name with spacing and non-spacing combining marks (Mc, Mn) is accepted whole."""
    name = "मोहन"
    assert {unicodedata.category(ch) for ch in name} >= {"Lo", "Mc"}
    assert validate_name("हिंदी") == "हिंदी"  # contains Mn (anusvara)


def test_decomposed_input_is_normalised_to_nfc() -> None:
    """An accent typed as a combining mark is composed (NFC) in the display form."""
    assert validate_name("Jose\u0301") == "José"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("  alice  ", "alice"), ("\talice\r", "alice"), ("\u3000山田\u00a0", "山田")],
)
def test_surrounding_whitespace_is_stripped(raw: str, expected: str) -> None:
    """White space around the name is forgiven and removed."""
    assert validate_name(raw) == expected


def test_exactly_max_characters_accepted() -> None:
    """A name of exactly MAX_NAME_CHARS (32) characters is accepted."""
    assert MAX_NAME_CHARS == 32
    assert validate_name("a" * 32) == "a" * 32


def test_length_counts_characters_not_bytes() -> None:
    """32 three-byte characters are still 32 characters, so they are accepted."""
    assert validate_name("山" * 32) == "山" * 32


# --- rejected -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "john smith",
        "a*b",
        "*",
        "a:b",
        "bang!",
        "@alice",
        "alice😀",
        "😀",
        "al\x1bice",
        "a\x00b",
        "a\x7fb",
        "a\u009bb",
        "tab\tname",
        "a\u200bb",  # zero width space
        "\u0301abc",  # combining mark cannot start a name
        "",
        "   ",
        "\t\r\n",
        "a" * 33,
    ],
)
def test_rejected_names_raise_invalid_name(raw: str) -> None:
    """Spaces inside, symbols, emoji, control chars, empty, blank and 33 chars are rejected."""
    with pytest.raises(InvalidName) as info:
        validate_name(raw)
    assert str(info.value)


def test_one_over_max_characters_rejected_with_the_limit_in_the_message() -> None:
    """33 characters are rejected and the message states the limit."""
    with pytest.raises(InvalidName, match="32"):
        validate_name("b" * 33)


def test_surrounding_whitespace_does_not_count_towards_the_length() -> None:
    """32 characters plus surrounding spaces are accepted: length is measured after stripping."""
    assert validate_name("  " + "c" * 32 + "  ") == "c" * 32


def test_invalid_name_is_a_peer_protocol_error() -> None:
    """InvalidName is a PeerProtocolError, so callers can answer it with a '! ' line."""
    with pytest.raises(PeerProtocolError):
        validate_name("no way")


def test_control_character_shown_as_code_point_not_raw() -> None:
    """The message names an unprintable character as U+XXXX, never the raw control itself."""
    with pytest.raises(InvalidName) as info:
        validate_name("a\x1bb")
    message = str(info.value)
    assert "U+001B" in message
    assert "\x1b" not in message


def test_printable_offending_character_is_quoted() -> None:
    """The message quotes the first printable character that is not allowed."""
    with pytest.raises(InvalidName, match=r"'\*'"):
        validate_name("a*b")


#: "Alice" in full-width forms (U+FF21 ...), spelt with escapes so no linter mistakes it for a typo.
FULL_WIDTH_ALICE = "\uff21\uff4c\uff49\uff43\uff45"

# --- name_key -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Alice", "ALICE"),
        ("Alice", "alice"),
        ("Alice", FULL_WIDTH_ALICE),
        ("ﬁ", "fi"),  # U+FB01 LATIN SMALL LIGATURE FI
        ("ﬁona", "FIONA"),
        ("Straße", "STRASSE"),  # casefold, not lower()
        ("José", "JOSÉ"),
        ("José", "Jose\u0301"),  # composed vs decomposed
        ("ΔΗΜΉΤΡΗΣ", "δημήτρης"),
    ],
)
def test_name_key_equal_for_names_that_look_the_same(a: str, b: str) -> None:
    """Case, width, ligatures (NFKC) and ß/SS (casefold) do not distinguish names."""
    assert name_key(a) == name_key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [("alice", "alicia"), ("José", "Jose"), ("山田", "田山"), ("a.b", "a-b")],
)
def test_name_key_differs_for_different_names(a: str, b: str) -> None:
    """Genuinely different names, accents included, keep different keys."""
    assert name_key(a) != name_key(b)


def test_name_key_of_full_width_is_plain_lowercase() -> None:
    """The key of full-width Alice is the plain ASCII 'alice'."""
    assert name_key(FULL_WIDTH_ALICE) == "alice"


def test_full_width_name_is_valid_and_shown_as_typed() -> None:
    """Full-width letters are letters: the name is accepted and displayed unchanged."""
    assert validate_name(FULL_WIDTH_ALICE) == FULL_WIDTH_ALICE


def test_name_key_is_idempotent() -> None:
    """Applying name_key to a key gives the key back."""
    for name in ["Straße", "ﬁ", FULL_WIDTH_ALICE, "Δημήτρης", "मोहन", "ᾳ"]:
        key = name_key(name)
        assert name_key(key) == key
