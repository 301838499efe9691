"""A Lua script run on one connection held for it alone: the hot path of publishing.

Every chat line a gateway takes goes to Redis as one script call. Through the client
object each call costs more client CPU than Redis spends running the script: a connection
taken from the pool and given back, a retry wrapper, a health check, every argument
encoded one by one, and a timeout and a stream read around every reply. Here one connection
is kept for the script: its keys and fixed arguments are encoded once per key set, the
command is written to the transport, and the reply is read from the bytes as they arrive
(:mod:`broker.tap`), with one timeout around the whole call. Nothing is retried: a call
whose reply is lost may have run, so the caller learns it failed, and the connection is
dropped (and made again by the next call) because its state is unknown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from broker.tap import NOT_ENOUGH_DATA, Tapped, tap

#: Key sets whose encoded prefix is kept, at most (one per room in use).
MAX_PREFIXES = 4096


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _encode(value: str | bytes | int) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


class _Link:
    """One tapped connection: its transport and reader, and whether the server closed it
    (a link dropped for a new one may still report its end: only its own state changes)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self.tapped: Tapped | None = None
        self.lost = False
        self._wake = wake

    def received(self, data: bytes) -> None:
        if self.tapped is not None:
            self.tapped.reader.feed(data)
        self._wake()

    def closed(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()


class HeldScript:
    """``script`` run on one connection borrowed from ``client``'s pool, with no pool,
    retry or per-read timeout per call; at most ``timeout`` seconds a call."""

    def __init__(self, script: AsyncScript, client: Redis, timeout: float) -> None:
        self._script = script
        self._pool = client.connection_pool
        self._timeout = timeout
        self._connection: Any = None
        #: The connection's tap, while it is up.
        self._link: _Link | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()
        source = script.script
        source = source.encode() if isinstance(source, str) else bytes(source)
        #: SCRIPT LOAD, for a Redis that lost its script cache.
        self._load = b"*3\r\n" + b"".join(map(_bulk, (b"SCRIPT", b"LOAD", source)))
        #: (keys, fixed arguments) -> how many words, and those words encoded.
        self._prefixes: dict[tuple[tuple[str, ...], tuple[str | int, ...]], tuple[int, bytes]] = {}

    async def __call__(
        self, keys: Sequence[str], fixed: Sequence[str | int], args: Sequence[str | bytes]
    ) -> Any:
        """Run the script with ``keys`` and the arguments ``fixed`` then ``args`` (the
        part that changes from call to call). Raises redis-py's errors, as the client
        would; a timeout as :class:`redis.exceptions.TimeoutError`."""
        words, prefix = self._prefix(tuple(keys), tuple(fixed))
        packed = b"".join(
            [b"*%d\r\n" % (words + len(args)), prefix, *(_bulk(_encode(a)) for a in args)]
        )
        async with self._lock:
            try:
                return await self._send(packed)
            except redis.exceptions.NoScriptError:  # a restarted Redis: it never ran
                await self._send(self._load)
                return await self._send(packed)

    async def aclose(self) -> None:
        """Close the connection and give it back to its pool."""
        self._link = None
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect(nowait=True)
            await self._pool.release(connection)

    async def _send(self, packed: bytes) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                link, tapped = await self._connected()
                tapped.transport.write(packed)
                reply = tapped.reader.gets()
                while reply is NOT_ENOUGH_DATA:
                    if link.lost:
                        raise redis.exceptions.ConnectionError("Redis closed the connection")
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    reply = tapped.reader.gets()
        except TimeoutError:
            await self._drop()
            raise redis.exceptions.TimeoutError(
                f"no answer from Redis in {self._timeout:.0f}s"
            ) from None
        except BaseException:
            await self._drop()
            raise
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply  # an error reply: the connection is fine
        if isinstance(reply, Exception):  # a protocol error: the stream cannot be trusted
            await self._drop()
            raise reply
        return reply

    async def _connected(self) -> tuple[_Link, Tapped]:
        """The connection's tap; the connection made (again) if it is not up. One the
        server closed while idle (a restart) is made again: nothing was sent on it yet."""
        link = self._link
        if link is not None and link.lost:
            await self._drop()
            link = None
        if link is not None and link.tapped is not None:
            return link, link.tapped
        if self._connection is None:
            pool: Any = self._pool
            self._connection = await pool.get_connection()
        connection = self._connection
        if not connection.is_connected:
            await connection.connect()
        link = _Link(self._wake)
        link.tapped = tap(connection, link.received, link.closed)
        if link.tapped is None:
            raise redis.exceptions.ConnectionError("the publish connection has no hiredis reader")
        self._link = link
        return link, link.tapped

    async def _drop(self) -> None:
        """Close the connection: whatever it still carries can no longer be trusted."""
        self._link = None
        if self._connection is not None:
            await self._connection.disconnect(nowait=True)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _prefix(self, keys: tuple[str, ...], fixed: tuple[str | int, ...]) -> tuple[int, bytes]:
        found = self._prefixes.get((keys, fixed))
        if found is None:
            if len(self._prefixes) >= MAX_PREFIXES:
                self._prefixes.clear()
            words = [b"EVALSHA", self._script.sha.encode(), b"%d" % len(keys)]
            words += [_encode(k) for k in (*keys, *fixed)]
            found = self._prefixes[(keys, fixed)] = (len(words), b"".join(map(_bulk, words)))
        return found
