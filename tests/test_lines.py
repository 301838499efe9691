"""LineBuffer framing and strip_controls: bytes in, bounded decoded lines out."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatwire.lines import MAX_LINE_BYTES, TOO_LONG, LineBuffer, TooLong, strip_controls

Item = str | TooLong


def feed_pieces(
    pieces: Iterable[bytes], *, limit: int = MAX_LINE_BYTES, finish: bool = True
) -> list[Item]:
    """Feed ``pieces`` one at a time, collecting every line; then ``finish()`` if asked."""
    buffer = LineBuffer(limit)
    items: list[Item] = []
    for piece in pieces:
        buffer.feed(piece)
        while (item := buffer.next_line()) is not None:
            items.append(item)
    if finish and (last := buffer.finish()) is not None:
        items.append(last)
    return items


def whole(data: bytes, *, limit: int = MAX_LINE_BYTES, finish: bool = True) -> list[Item]:
    return feed_pieces([data], limit=limit, finish=finish)


def bytewise(data: bytes, *, limit: int = MAX_LINE_BYTES, finish: bool = True) -> list[Item]:
    pieces = [data[i : i + 1] for i in range(len(data))]
    return feed_pieces(pieces, limit=limit, finish=finish)


Feed = Callable[[bytes], list[Item]]


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


# --- endings ------------------------------------------------------------------------------


def test_lf_endings() -> None:
    """LF ends a line and is not part of it."""
    assert whole(b"one\ntwo\n") == ["one", "two"]


def test_crlf_endings() -> None:
    """CRLF ends a line; the CR is dropped too."""
    assert whole(b"one\r\ntwo\r\n") == ["one", "two"]


def test_mixed_endings_and_empty_lines() -> None:
    """LF and CRLF can be mixed, and empty lines come out as empty strings."""
    assert whole(b"a\r\nb\n\n\r\nc\n") == ["a", "b", "", "", "c"]


def test_lone_cr_is_not_an_ending() -> None:
    """A CR that is not followed by LF stays inside the line (then strip_controls removes it)."""
    assert whole(b"a\rb\n") == ["a\rb"]


def test_no_line_until_lf() -> None:
    """Without an LF, next_line returns None and keeps the bytes for later."""
    buffer = LineBuffer()
    buffer.feed(b"hel")
    assert buffer.next_line() is None
    buffer.feed(b"lo\r")
    assert buffer.next_line() is None
    buffer.feed(b"\nrest")
    assert buffer.next_line() == "hello"
    assert buffer.next_line() is None


@pytest.mark.parametrize(
    "data",
    [
        b"one\ntwo\n",
        b"one\r\ntwo\r\n\r\n",
        b"caf\xc3\xa9\r\n\xe5\xb1\xb1\xe7\x94\xb0\n",
        b"bad \xff\xc3\n tail",
        b"x" * 5000 + b"\r\nafter\n",
        b"y" * (MAX_LINE_BYTES + 1) + b"\r\nafter\n",
    ],
)
def test_whole_and_bytewise_agree(data: bytes) -> None:
    """Feeding the same bytes whole or byte by byte gives the same lines."""
    assert bytewise(data) == whole(data)


# --- the length limit ---------------------------------------------------------------------


def test_line_of_exactly_the_limit_passes_whole() -> None:
    """A line of exactly MAX_LINE_BYTES bytes is delivered intact."""
    line = b"a" * MAX_LINE_BYTES
    assert whole(line + b"\nnext\n") == ["a" * MAX_LINE_BYTES, "next"]


def test_line_of_exactly_the_limit_passes_bytewise() -> None:
    """A line of exactly MAX_LINE_BYTES bytes fed byte by byte is delivered intact."""
    line = b"a" * MAX_LINE_BYTES
    assert bytewise(line + b"\nnext\n") == ["a" * MAX_LINE_BYTES, "next"]


def test_one_byte_over_the_limit_whole() -> None:
    """MAX_LINE_BYTES + 1 bytes gives TOO_LONG once, and the next line still works."""
    assert whole(b"a" * (MAX_LINE_BYTES + 1) + b"\nnext\n") == [TOO_LONG, "next"]


def test_one_byte_over_the_limit_bytewise() -> None:
    """Byte by byte, MAX_LINE_BYTES + 1 bytes also gives TOO_LONG once, then the next line."""
    assert bytewise(b"a" * (MAX_LINE_BYTES + 1) + b"\nnext\n") == [TOO_LONG, "next"]


@pytest.mark.parametrize("feed", [whole, bytewise], ids=["whole", "bytewise"])
def test_far_over_the_limit_reported_once(feed: Feed) -> None:
    """A line many times the limit gives a single TOO_LONG, and the following line survives."""
    data = b"z" * (3 * MAX_LINE_BYTES) + b"\r\nnext\r\n"
    assert feed(data) == [TOO_LONG, "next"]


def test_too_long_reported_before_its_lf_arrives() -> None:
    """The buffer does not grow without end: TOO_LONG comes out before the LF is seen."""
    buffer = LineBuffer()
    buffer.feed(b"a" * (MAX_LINE_BYTES + 2))
    assert buffer.next_line() is TOO_LONG
    buffer.feed(b"a" * 10_000)
    assert buffer.next_line() is None
    buffer.feed(b"tail\nok\n")
    assert buffer.next_line() == "ok"
    assert buffer.next_line() is None


@pytest.mark.parametrize("feed", [whole, bytewise], ids=["whole", "bytewise"])
def test_cr_slack_allows_limit_plus_crlf(feed: Feed) -> None:
    """MAX_LINE_BYTES bytes followed by CRLF is a legal line, not TOO_LONG."""
    data = b"a" * MAX_LINE_BYTES + b"\r\nnext\r\n"
    assert feed(data) == ["a" * MAX_LINE_BYTES, "next"]


@pytest.mark.parametrize("feed", [whole, bytewise], ids=["whole", "bytewise"])
def test_cr_slack_is_only_for_the_cr(feed: Feed) -> None:
    """MAX_LINE_BYTES + 1 bytes followed by CRLF is still too long."""
    data = b"a" * (MAX_LINE_BYTES + 1) + b"\r\nnext\r\n"
    assert feed(data) == [TOO_LONG, "next"]


def test_limit_counts_bytes_not_characters() -> None:
    """The limit is in UTF-8 bytes: 2048 two-byte characters fit, one more byte does not."""
    fits = "é" * (MAX_LINE_BYTES // 2)
    assert whole(fits.encode() + b"\n") == [fits]
    assert whole(fits.encode() + b"a\n") == [TOO_LONG]


def test_custom_limit() -> None:
    """The limit is a constructor argument."""
    assert whole(b"abcd\nabcde\nok\n", limit=4) == ["abcd", TOO_LONG, "ok"]


def test_too_long_is_a_singleton_of_its_type() -> None:
    """TOO_LONG is the TooLong marker, so both `is` and isinstance checks work."""
    item = whole(b"a" * (MAX_LINE_BYTES + 1) + b"\n")[0]
    assert item is TOO_LONG
    assert isinstance(item, TooLong)


# --- decoding -----------------------------------------------------------------------------


def test_invalid_utf8_becomes_replacement_character() -> None:
    """Bytes that are not UTF-8 decode to U+FFFD instead of failing."""
    assert whole(b"ab\xffcd\n\xc3\n\xe5\xb1\n") == ["ab\ufffdcd", "\ufffd", "\ufffd"]


def test_multibyte_character_split_across_feeds() -> None:
    """A UTF-8 sequence cut between two feeds is decoded as one character."""
    assert feed_pieces([b"caf\xc3", b"\xa9\n"]) == ["café"]


# --- finish -------------------------------------------------------------------------------


def test_finish_returns_unterminated_last_line() -> None:
    """At end of stream, finish() hands out the bytes after the last LF as a line."""
    buffer = LineBuffer()
    buffer.feed(b"one\ntwo")
    assert buffer.next_line() == "one"
    assert buffer.next_line() is None
    assert buffer.finish() == "two"
    assert buffer.finish() is None


def test_finish_drops_a_trailing_cr() -> None:
    """An unterminated last line ending in CR loses the CR like a CRLF line would."""
    assert whole(b"two\r") == ["two"]


def test_finish_with_nothing_pending() -> None:
    """finish() returns None when every line was terminated, or nothing was sent."""
    assert whole(b"one\n") == ["one"]
    assert LineBuffer().finish() is None


def test_finish_after_unterminated_too_long_line() -> None:
    """An unterminated over-long last line is reported once: as TOO_LONG, never as text."""
    assert whole(b"a" * (MAX_LINE_BYTES + 1)) == [TOO_LONG]
    assert whole(b"a" * (3 * MAX_LINE_BYTES)) == [TOO_LONG]
    assert bytewise(b"a" * (MAX_LINE_BYTES + 5)) == [TOO_LONG]


# --- properties ---------------------------------------------------------------------------

_FRAGMENTS = st.one_of(
    st.sampled_from([b"\n", b"\r", b"\r\n", b"\xff", b"\xc3", b"\xa9", b"ab", b"\xe5\xb1\xb1"]),
    st.binary(max_size=6),
)


@st.composite
def bytes_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = b"".join(draw(st.lists(_FRAGMENTS, max_size=30)))
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=10))
    return data, cuts


@settings(max_examples=200, deadline=None)
@given(case=bytes_and_cuts(), limit=st.integers(1, 12), finish=st.booleans())
def test_any_split_gives_the_same_lines(
    case: tuple[bytes, list[int]], limit: int, finish: bool
) -> None:
    """Whole, byte-by-byte and arbitrary splits give the same lines, whatever the limit."""
    data, cuts = case
    expected = whole(data, limit=limit, finish=finish)
    assert feed_pieces(split_at(data, cuts), limit=limit, finish=finish) == expected
    assert bytewise(data, limit=limit, finish=finish) == expected
    for item in expected:
        assert item is TOO_LONG or ("\n" not in item and len(item) <= limit)


# --- strip_controls -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\x1b[2Jhi", "[2Jhi"),
        ("a\x7fb", "ab"),
        ("a\u009bb", "ab"),
        ("a\x00b", "ab"),
        ("a\rb\nc", "abc"),
        ("bell\x07", "bell"),
    ],
)
def test_strip_controls_removes_controls(text: str, expected: str) -> None:
    """ESC, DEL, C1 controls such as U+009B, NUL, CR and LF are removed."""
    assert strip_controls(text) == expected


def test_strip_controls_removes_every_c0_c1_and_del_but_tab() -> None:
    """Every C0 control except TAB, DEL and every C1 control is removed."""
    controls = [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F, *range(0x80, 0xA0)]
    assert strip_controls("".join(map(chr, controls))) == ""


def test_strip_controls_keeps_tab_and_text() -> None:
    """TAB, spaces, non-ASCII letters, NBSP and U+FFFD are kept unchanged."""
    text = "a\tb c é 山 मोहन \u00a0 \ufffd ~"
    assert strip_controls(text) == text
