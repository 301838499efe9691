"""Taking a redis-py connection's incoming bytes as they arrive.

redis-py reads a connection through an ``asyncio.StreamReader``: every reply costs a
future, a stream read and, through the client, a timeout. Where a connection is read by
one owner only (a bus subscription, the held publish connection), :func:`tap` puts a small
protocol in front of redis-py's on the connection's transport: the bytes go straight to
the owner, who feeds them to the connection's own hiredis reader (so error replies are the
exceptions redis-py would raise), and every other event is handed on to redis-py's
protocol, so that closing the connection works as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

try:  # redis-py's hiredis parser, whose reader the owner feeds
    from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
except ImportError:  # pragma: no cover - an older or newer layout: no tap
    NOT_ENOUGH_DATA, _AsyncHiredisParser = None, None  # type: ignore[assignment, misc]

__all__ = ["NOT_ENOUGH_DATA", "Tapped", "tap"]


class _Tap(asyncio.Protocol):
    def __init__(
        self,
        inner: asyncio.Protocol,
        received: Callable[[bytes], None],
        lost: Callable[[Exception | None], None],
    ) -> None:
        self.inner = inner
        self._received = received
        self._lost = lost

    def data_received(self, data: bytes) -> None:
        self._received(data)

    def eof_received(self) -> bool | None:
        self._lost(None)
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class Tapped:
    """A tapped connection: its transport (to write to, pause and resume) and the hiredis
    reader its bytes are to be fed to (``reader.gets()`` returns :data:`NOT_ENOUGH_DATA`
    until a whole reply is in)."""

    def __init__(self, transport: Any, reader: Any) -> None:
        self.transport = transport
        self.reader = reader


def tap(
    connection: Any,
    received: Callable[[bytes], None],
    lost: Callable[[Exception | None], None],
) -> Tapped | None:
    """From now on, hand ``connection``'s incoming bytes to ``received`` (those its stream
    holds already are fed to the reader at once), and call ``lost`` when the server closes
    it or the link breaks. None where it cannot be done: no hiredis parser, or not a real
    socket (fakeredis)."""
    parser = getattr(connection, "_parser", None)
    stream = getattr(connection, "_reader", None)
    writer = getattr(connection, "_writer", None)
    if not (
        _AsyncHiredisParser is not None
        and isinstance(parser, _AsyncHiredisParser)
        and isinstance(stream, asyncio.StreamReader)  # fakeredis has a reader of its own
        and writer is not None
    ):
        return None
    transport = writer.transport
    transport.set_protocol(_Tap(transport.get_protocol(), received, lost))
    tapped = Tapped(transport, parser._reader)
    held = getattr(stream, "_buffer", None)
    if held:  # come already (a subscription's confirmation): read with what follows
        tapped.reader.feed(bytes(held))
        held.clear()
    if getattr(stream, "_paused", False):  # it had stopped reading: it is ours to resume
        stream._paused = False  # type: ignore[attr-defined]
        transport.resume_reading()
    if stream.at_eof():  # the server had closed it already
        lost(None)
    return tapped
