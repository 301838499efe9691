"""Reading a subscribed connection in bulk: every reply one socket read brings, parsed by
hiredis in one go.

redis-py's ``PubSub.get_message`` costs some 30 µs a message (timeouts, health checks and
a dict per message, on each call); a busy gateway receives tens of thousands of bus
messages a second. Once subscribed, the connection only ever brings pub/sub replies, so
this reads them straight from the connection's hiredis reader (1.5 µs a message, measured
with ``bench``'s message size). It sends its own keepalive ``PING`` when the connection has
been quiet for a while, and calls the connection dead when even that gets no answer.

Where the connection has no hiredis parser (hiredis missing, or the embedded fakeredis),
it falls back to ``get_message``; the replies look the same either way.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.exceptions
from redis.asyncio.client import PubSub

from broker.translate import text

try:  # redis-py's hiredis parser, whose reader and socket read this drives
    from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
except ImportError:  # pragma: no cover - an older or newer layout: use get_message
    NOT_ENOUGH_DATA, _AsyncHiredisParser = None, None  # type: ignore[assignment, misc]

#: One pub/sub reply: (kind, channel, payload), e.g. ("message", "chat:room:{#a}:bus",
#: b"...") or ("subscribe", channel, 1). Kinds are as Redis names them.
Reply = tuple[str, str, Any]


def _reply(reply: Any) -> Reply:
    """A reply as a :data:`Reply`. Pub/sub replies are lists (RESP3 pushes, or RESP2
    arrays); a keepalive's answer is ``["pong", ""]`` in RESP2 but ``PONG`` in RESP3."""
    if isinstance(reply, list):
        return text(reply[0]), text(reply[1]), reply[2] if len(reply) > 2 else None
    if reply in (b"PONG", "PONG"):
        return "pong", "", None
    return "reply", "", reply


class BulkReader:
    """The replies arriving on ``pubsub``'s connection (subscribed already)."""

    def __init__(self, pubsub: PubSub, keepalive: float, answer_timeout: float) -> None:
        """``keepalive``: seconds of silence after which a ``PING`` is sent;
        ``answer_timeout``: seconds after that with still nothing received before the
        connection is called dead (:class:`redis.exceptions.ConnectionError`)."""
        self._pubsub = pubsub
        self._keepalive = keepalive
        self._answer_timeout = answer_timeout
        connection = pubsub.connection
        parser = getattr(connection, "_parser", None)
        usable = (
            _AsyncHiredisParser is not None
            and isinstance(parser, _AsyncHiredisParser)
            # a real socket's reader (fakeredis has a parser, but its own reader)
            and isinstance(getattr(connection, "_reader", None), asyncio.StreamReader)
        )
        self._parser: Any = parser if usable else None
        #: Whether replies are read in bulk (else one by one, through redis-py).
        self.bulk = usable
        self._heard = time.monotonic()
        self._pinged = False
        self._error: Exception | None = None

    async def read(self, wait: float, most: int) -> list[Reply]:
        """The replies received so far, up to ``most``; waits ``wait`` seconds at most
        for the first ([] if none came). Error replies are raised."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._parser is None:
            return await self._read_one_by_one(wait, most)
        reader = self._parser._reader
        replies: list[Reply] = []
        reply = reader.gets()
        if reply is NOT_ENOUGH_DATA:
            await self._wait_for_data(wait)
            reply = reader.gets()
        while reply is not NOT_ENOUGH_DATA:
            if isinstance(reply, Exception):
                if not replies:
                    raise reply
                self._error = reply  # raised by the next read, after those before it
                break
            replies.append(parsed := _reply(reply))
            if parsed[0] in ("unsubscribe", "sunsubscribe"):
                self._settle(parsed[0], reply[1])
            if len(replies) >= most:
                break
            reply = reader.gets()
        if replies:
            self._heard, self._pinged = time.monotonic(), False
        return replies

    def _settle(self, kind: str, channel: Any) -> None:
        """Keep redis-py's account of the subscriptions, as ``get_message`` would: a
        channel whose unsubscription is confirmed is forgotten."""
        pubsub = self._pubsub
        if kind == "unsubscribe":
            pending, channels = pubsub.pending_unsubscribe_channels, pubsub.channels
        else:
            pending, channels = pubsub.pending_unsubscribe_shard_channels, pubsub.shard_channels
        if channel in pending:
            pending.remove(channel)
            channels.pop(channel, None)

    async def _wait_for_data(self, wait: float) -> None:
        """One socket read into the parser, or nothing after ``wait`` seconds (then a
        keepalive is due, or the connection is dead)."""
        try:
            async with asyncio.timeout(wait):
                await self._parser.read_from_socket()
            return
        except TimeoutError:
            pass
        quiet = time.monotonic() - self._heard
        if self._pinged and quiet > self._keepalive + self._answer_timeout:
            raise redis.exceptions.ConnectionError(
                f"no answer from Redis for {quiet:.0f}s, not even to PING"
            )
        if not self._pinged and quiet > self._keepalive:
            self._pinged = True
            connection = self._pubsub.connection
            if connection is None:
                raise redis.exceptions.ConnectionError("the subscription's connection is gone")
            await connection.send_command("PING")

    async def _read_one_by_one(self, wait: float, most: int) -> list[Reply]:
        replies: list[Reply] = []
        message = await self._pubsub.get_message(timeout=wait)
        while message is not None:
            channel = message["channel"]
            replies.append((text(message["type"]), text(channel or b""), message["data"]))
            if len(replies) >= most:
                break
            message = await self._pubsub.get_message(timeout=0)
        return replies
