"""A Lua script run on one connection held for it alone: the hot path of publishing.

Every chat line a gateway takes goes to Redis as one script call. Through the client
object each call costs more client CPU than Redis spends running the script: a connection
taken from the pool and given back, a retry wrapper, a health check, every argument
encoded one by one, and a timeout task around every socket read. Here one connection is
kept for the script, its keys and fixed arguments are encoded once per key set, and one
timeout covers the whole call. Nothing is retried: a call whose reply is lost may have
run, so the caller learns it failed, and the connection is dropped (and made again by the
next call) because its state is unknown.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

#: Key sets whose encoded prefix is kept, at most (one per room in use).
MAX_PREFIXES = 4096


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _encode(value: str | bytes | int) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _closed_by_server(connection: Any) -> bool:
    """Whether the server has closed ``connection`` (its end of file already received)."""
    stream = getattr(connection, "_reader", None)
    return isinstance(stream, asyncio.StreamReader) and stream.at_eof()


class HeldScript:
    """``script`` run on one connection borrowed from ``client``'s pool, with no pool,
    retry or per-read timeout per call; at most ``timeout`` seconds a call."""

    def __init__(self, script: AsyncScript, client: Redis, timeout: float) -> None:
        self._script = script
        self._pool = client.connection_pool
        self._timeout = timeout
        self._connection: Any = None
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
        """Give the connection back to its pool (which closes it with the client)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await self._pool.release(connection)

    async def _send(self, packed: bytes) -> Any:
        connection = self._connection
        if connection is None:
            pool: Any = self._pool
            connection = self._connection = await pool.get_connection()
        try:
            async with asyncio.timeout(self._timeout):
                if connection.is_connected and _closed_by_server(connection):
                    # Redis went away while the connection was idle (a restart): nothing
                    # was sent on it, so connecting again is safe, as the pool would.
                    await connection.disconnect(nowait=True)
                if not connection.is_connected:
                    await connection.connect()
                await connection.send_packed_command(packed, check_health=False)
                return await connection.read_response(timeout=math.inf)
        except redis.exceptions.ResponseError:
            raise  # an error reply: the connection is fine
        except TimeoutError:
            await connection.disconnect(nowait=True)
            raise redis.exceptions.TimeoutError(
                f"no answer from Redis in {self._timeout:.0f}s"
            ) from None
        except BaseException:
            await connection.disconnect(nowait=True)
            raise

    def _prefix(self, keys: tuple[str, ...], fixed: tuple[str | int, ...]) -> tuple[int, bytes]:
        found = self._prefixes.get((keys, fixed))
        if found is None:
            if len(self._prefixes) >= MAX_PREFIXES:
                self._prefixes.clear()
            words = [b"EVALSHA", self._script.sha.encode(), b"%d" % len(keys)]
            words += [_encode(k) for k in (*keys, *fixed)]
            found = self._prefixes[(keys, fixed)] = (len(words), b"".join(map(_bulk, words)))
        return found
