"""Bounded framing of a byte stream into text lines, shared by the gateway and the client.

No sockets and no asyncio here: bytes go in, decoded lines come out. Feeding the same bytes
whole, byte by byte or split anywhere yields the same lines.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Longest line accepted, in bytes, not counting the LF or CRLF that ends it. 4 KiB holds a
#: long paragraph; past it a peer is either broken or trying to make us buffer without end.
MAX_LINE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class TooLong:
    """A line exceeded the limit; its bytes up to the next LF were discarded."""


TOO_LONG = TooLong()

# C0 controls except TAB, DEL, and C1 controls: removed from text so that no user can move
# another user's cursor, clear their screen or forge line breaks.
_CONTROLS = dict.fromkeys([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F, *range(0x80, 0xA0)])


def strip_controls(text: str) -> str:
    """Remove control characters (tab aside) from ``text``."""
    return text.translate(_CONTROLS)


class LineBuffer:
    """Accumulates bytes and hands out complete lines, never holding more than one line."""

    __slots__ = ("_buffer", "_discarding", "_limit")

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self._buffer = bytearray()
        self._discarding = False
        self._limit = limit

    def feed(self, data: bytes) -> None:
        """Append received bytes; call :meth:`next_line` until it returns ``None``."""
        self._buffer += data

    def next_line(self) -> str | TooLong | None:
        """The next complete line (decoded, without its terminator), ``TOO_LONG``, or ``None``.

        Invalid UTF-8 becomes U+FFFD: a broken client is answered, never disconnected for it.
        """
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                return self._check_partial()
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding:
                # The tail of a line already reported as too long.
                self._discarding = False
                continue
            return self._decode(raw)

    def has_line(self) -> bool:
        """Whether a complete line is waiting to be taken."""
        return b"\n" in self._buffer

    def finish(self) -> str | TooLong | None:
        """At end of stream: the unterminated last line, if any (the peer forgot its LF)."""
        raw, self._buffer = bytes(self._buffer), bytearray()
        if self._discarding or not raw:
            return None
        return self._decode(raw)

    def _check_partial(self) -> TooLong | None:
        if self._discarding:
            self._buffer.clear()
            return None
        # One byte of slack for the CR of a CRLF ending that has not arrived yet.
        if len(self._buffer) <= self._limit + 1:
            return None
        self._buffer.clear()
        self._discarding = True
        return TOO_LONG

    def _decode(self, raw: bytes) -> str | TooLong:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > self._limit:
            return TOO_LONG
        return raw.decode("utf-8", "replace")
