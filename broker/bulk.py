"""Reading a subscribed connection in bulk: the bytes Redis sends are fed to hiredis as
they arrive, and every complete reply is taken in one go.

redis-py's ``PubSub.get_message`` costs some 30 µs a message (timeouts, health checks and
a dict per message, on each call), and even reading its connection's stream directly
wakes a chain of futures, a timeout and a stream read for every socket read. A gateway's
subscription is woken by nearly every message it carries, so this takes the connection's
incoming bytes straight from the transport instead (:mod:`broker.tap`), feeds them to the
connection's own hiredis reader, and hands the replies to the relay there and then (or
wakes the one waiting reader). Once subscribed, the connection only ever brings pub/sub
replies, and redis-py never reads it again. A timer sends a keepalive ``PING`` when the
connection has been quiet for a while, and calls the connection dead when even that gets
no answer.

Where the connection has no hiredis parser (hiredis missing, or the embedded fakeredis),
it falls back to ``get_message``; the replies look the same either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import redis.exceptions
from redis.asyncio.client import PubSub

from broker.tap import NOT_ENOUGH_DATA, tap
from broker.translate import text

log = logging.getLogger(__name__)

#: One pub/sub reply: (kind, channel, payload), e.g. ("message", "chat:room:{#a}:bus",
#: b"...") or ("subscribe", channel, 1). Kinds are as Redis names them.
Reply = tuple[str, str, Any]

#: Seconds a read waits on the fallback path (``get_message``) before returning nothing.
POLL_INTERVAL = 1.0
#: Bytes received and not yet read past which the connection stops reading: Redis then
#: holds what follows, and cuts the subscription if it holds too much (the gap is replayed
#: from the streams), rather than this process buffering without end.
MAX_UNREAD = 4 * 1024 * 1024

_PING = b"*1\r\n$4\r\nPING\r\n"
_MESSAGE = (b"message", b"smessage")


def _reply(reply: Any) -> Reply:
    """A reply as a :data:`Reply`. Pub/sub replies are lists (RESP3 pushes, or RESP2
    arrays); a keepalive's answer is ``["pong", ""]`` in RESP2 but ``PONG`` in RESP3."""
    if isinstance(reply, list):
        return text(reply[0]), text(reply[1]), reply[2] if len(reply) > 2 else None
    if reply in (b"PONG", "PONG"):
        return "pong", "", None
    return "reply", "", reply


class BulkReader:
    """The replies arriving on ``pubsub``'s connection (subscribed already). One reader per
    connection; :meth:`close` it when done with the connection."""

    def __init__(self, pubsub: PubSub, keepalive: float, answer_timeout: float) -> None:
        """``keepalive``: seconds of silence after which a ``PING`` is sent;
        ``answer_timeout``: seconds after that with still nothing received before the
        connection is called dead (:class:`redis.exceptions.ConnectionError`)."""
        self._pubsub = pubsub
        self._keepalive = keepalive
        self._answer_timeout = answer_timeout
        self._error: Exception | None = None
        self._most = 0
        self._waiter: asyncio.Future[None] | None = None
        #: Given by :meth:`run`: takes the replies as they arrive.
        self._sink: Callable[[list[Reply]], None] | None = None
        self._unread = 0
        self._paused = False
        self._heard = True
        self._pinged = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: Any = None
        #: The connection's hiredis reader, once tapped (else None: read one by one).
        self._reader: Any = None
        taken = tap(pubsub.connection, self._received, self._lost)
        if taken is not None:
            self._transport, self._reader = taken.transport, taken.reader
            if self._error is None:  # not closed already
                self._timer = asyncio.get_running_loop().call_later(self._keepalive, self._check)
        #: Whether replies are read in bulk (else one by one, through redis-py).
        self.bulk = self._reader is not None

    def close(self) -> None:
        """Stop the keepalive (the connection itself is closed by its owner)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def read(self, most: int) -> list[Reply]:
        """The replies received so far, up to ``most``; waits for the first (in bulk), or
        at most :data:`POLL_INTERVAL` seconds (one by one: [] if none came). Error replies
        are raised, as is the connection's loss."""
        if self._reader is None:
            return await self._read_one_by_one(most)
        replies = self._take(most)
        while not replies:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            await self._wait()
            replies = self._take(most)
        return replies

    async def run(self, sink: Callable[[list[Reply]], None], most: int) -> None:
        """Hand the replies to ``sink`` as they arrive, up to ``most`` at a time, until the
        connection fails (raised here, as by :meth:`read`). In bulk, ``sink`` is called
        from the connection's protocol as the bytes come in, with no task woken between;
        what it raises is logged, and the replies after it go on."""
        if self._reader is None:
            while True:
                replies = await self._read_one_by_one(most)
                if replies:
                    sink(replies)
        self._sink, self._most = sink, most
        try:
            self._hand_over()
            while self._error is None:
                await self._wait()
            error, self._error = self._error, None
            raise error
        finally:
            self._sink = None

    def _hand_over(self) -> None:
        """Every complete reply received, to the sink; an error reply ends :meth:`run`
        once those before it are handed over."""
        assert self._sink is not None
        while True:
            try:
                replies = self._take(self._most)
            except Exception as exc:  # an error reply first: the subscription is unusable
                self._fail(exc)
                return
            if replies:
                try:
                    self._sink(replies)
                except Exception:
                    log.exception("unexpected error handling %d bus replies", len(replies))
            if self._error is not None:  # an error reply came after these
                self._wake()
                return
            if len(replies) < self._most:  # all that had come
                return

    def _take(self, most: int) -> list[Reply]:
        reader = self._reader
        replies: list[Reply] = []
        while len(replies) < most:
            reply = reader.gets()
            if reply is NOT_ENOUGH_DATA:
                self._unread = 0
                if self._paused:
                    self._paused = False
                    self._transport.resume_reading()
                break
            if isinstance(reply, Exception):
                if not replies:
                    raise reply
                self._error = reply  # raised by the next read, after those before it
                break
            if isinstance(reply, list) and reply[0] in _MESSAGE:  # the bulk of them
                kind = "message" if reply[0] == b"message" else "smessage"
                replies.append((kind, text(reply[1]), reply[2]))
                continue
            replies.append(parsed := _reply(reply))
            if parsed[0] in ("unsubscribe", "sunsubscribe"):
                self._settle(parsed[0], reply[1])
        return replies

    def _received(self, data: bytes) -> None:
        self._reader.feed(data)
        self._heard = True
        if self._sink is not None:
            self._hand_over()
            return
        self._unread += len(data)
        if self._unread > MAX_UNREAD and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def _lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(redis.exceptions.ConnectionError(f"Redis closed the connection{reason}"))

    def _fail(self, error: Exception) -> None:
        """The connection is unusable: the waiting read (or the next) raises ``error``."""
        if self._error is None:
            self._error = error
        self.close()
        self._wake()

    async def _wait(self) -> None:
        """Until :meth:`_wake`: bytes came, or the connection failed."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check(self) -> None:
        """The keepalive, every ``keepalive`` seconds: a PING once a whole period has
        passed in silence, and the connection called dead if ``answer_timeout`` seconds
        more bring nothing."""
        loop = asyncio.get_running_loop()
        if self._heard:
            self._heard, self._pinged = False, False
        elif not self._pinged:
            self._pinged = True
            self._transport.write(_PING)
            self._timer = loop.call_later(self._answer_timeout, self._check)
            return
        else:
            quiet = self._keepalive + self._answer_timeout
            self._fail(redis.exceptions.ConnectionError(
                f"no answer from Redis for {quiet:.0f}s, not even to PING"))  # fmt: skip
            return
        self._timer = loop.call_later(self._keepalive, self._check)

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

    async def _read_one_by_one(self, most: int) -> list[Reply]:
        replies: list[Reply] = []
        message = await self._pubsub.get_message(timeout=POLL_INTERVAL)
        while message is not None:
            channel = message["channel"]
            replies.append((text(message["type"]), text(channel or b""), message["data"]))
            if len(replies) >= most:
                break
            message = await self._pubsub.get_message(timeout=0)
        return replies
