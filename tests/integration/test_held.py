"""Publishing on a connection held for it (broker/held.py), on a real redis-server: the
ids come back and the events reach subscribers as through the client; a flushed script
cache, a dropped connection and a frozen server each give a clear outcome, never a
message sent twice."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from broker import BrokerUnavailable, RedisBroker
from broker.events import ChatRun, decode_bus_message, encode_message
from broker.held import HeldScript
from broker.scripts import sources
from chatwire.names import DEFAULT_ROOM_KEY
from tests.support import RedisServer, T

pytestmark = pytest.mark.integration


@pytest.fixture
async def broker(redis_server: RedisServer) -> AsyncIterator[RedisBroker]:
    broker = await RedisBroker.connect(redis_server.url)
    try:
        yield broker
    finally:
        await broker.close()


async def said(url: str, room: str) -> list[str]:
    """The texts kept in ``room``'s history, oldest first."""
    broker = await RedisBroker.connect(url)
    try:
        return [m.text for m in await broker.history(room, 100)]
    finally:
        await broker.close()


async def test_publish_returns_the_ids_and_subscribers_get_the_events(
    redis_server: RedisServer, broker: RedisBroker
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub()
    try:
        channel = f"chat:room:{{{DEFAULT_ROOM_KEY}}}:bus"
        await pubsub.subscribe(channel)
        bodies = [encode_message("ana", f"line {n} é") for n in range(3)]
        ids = await broker.publish(DEFAULT_ROOM_KEY, bodies)
        assert len(ids) == 3 and ids == sorted(ids)
        run = None
        deadline = time.monotonic() + T
        while run is None and time.monotonic() < deadline:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                run = decode_bus_message(message["data"])
        # The three went out as one run: the lines ready to send, and every id.
        assert isinstance(run, ChatRun)
        assert list(run.ids) == ids
        assert run.lines == "".join(f"ana: line {n} é\n" for n in range(3)).encode()
        assert [(m.id, m.name, m.text) for m in run.messages()] == [
            (i, "ana", f"line {n} é") for n, i in enumerate(ids)
        ]
        # Many rooms: each its own keys (the encoded prefix is kept per room).
        assert await broker.publish("#other", [encode_message("ana", "x")]) == []  # empty
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


async def test_a_flushed_script_cache_is_loaded_again(
    redis_server: RedisServer, broker: RedisBroker
) -> None:
    await broker.publish(DEFAULT_ROOM_KEY, [encode_message("ana", "before")])
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    await broker.publish(DEFAULT_ROOM_KEY, [encode_message("ana", "after")])
    assert await said(redis_server.url, DEFAULT_ROOM_KEY) == ["before", "after"]


async def test_a_dropped_connection_fails_one_call_and_the_next_connects_again(
    redis_server: RedisServer, broker: RedisBroker
) -> None:
    await broker.publish(DEFAULT_ROOM_KEY, [encode_message("ana", "first")])
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        killed = await client.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 1
    finally:
        await client.aclose()
    outcomes = []
    for text in ("second", "third"):
        try:
            await broker.publish(DEFAULT_ROOM_KEY, [encode_message("ana", text)])
            outcomes.append(text)
        except BrokerUnavailable:
            outcomes.append("failed")
    # The dead link is found by the first call at most; the next one reconnects.
    assert outcomes[-1] == "third"
    kept = await said(redis_server.url, DEFAULT_ROOM_KEY)
    assert kept == ["first", *(o for o in outcomes if o != "failed")]


async def test_a_restarted_server_is_connected_to_again_before_the_call(
    redis_server: RedisServer, broker: RedisBroker
) -> None:
    await broker.publish(DEFAULT_ROOM_KEY, [encode_message("ana", "before")])
    await redis_server.stop()
    await redis_server.start(redis_server.port)
    # The held connection was closed by the old server while idle: nothing was sent on
    # it, so the call goes out on a new one, and is not refused.
    ids = await broker.publish(DEFAULT_ROOM_KEY, [encode_message("ana", "after")])
    assert len(ids) == 1
    assert await said(redis_server.url, DEFAULT_ROOM_KEY) == ["after"]  # no file kept


async def test_a_frozen_server_fails_the_call_within_its_timeout(
    redis_server: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    script = client.register_script(sources(False)["publish"])
    held = HeldScript(script, client, timeout=0.5)
    keys_ = [f"chat:room:{{{DEFAULT_ROOM_KEY}}}:{k}" for k in ("log", "bus", "members", "name")]
    keys_.append(f"chat:room:{{{DEFAULT_ROOM_KEY}}}:said")
    fixed = (100, 100, "1", "1")
    try:
        assert len(await held(keys_, fixed, [encode_message("ana", "hi")])) == 1
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError, match="no answer"):
                await held(keys_, fixed, [encode_message("ana", "lost?")])
            assert time.monotonic() - started < 2
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        # Answered again: a new connection, and the call runs once.
        assert len(await held(keys_, fixed, [encode_message("ana", "again")])) == 1
    finally:
        await held.aclose()
        await client.aclose()
