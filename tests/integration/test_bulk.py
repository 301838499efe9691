"""Reading a subscribed connection in bulk (broker/bulk.py), on a real redis-server: many
replies per read, in order; an error reply after the replies before it; a quiet server
kept alive by PING, a frozen one called dead."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from broker.bulk import BulkReader, Reply
from tests.support import RedisServer, T

pytestmark = pytest.mark.integration

CHANNEL = "chat:room:{#bulk}:bus"


@pytest.fixture
async def subscribed(redis_server: RedisServer) -> AsyncIterator[aioredis.client.PubSub]:
    client = aioredis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub()
    await pubsub.subscribe(CHANNEL)
    try:
        yield pubsub
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


async def read_until(reader: BulkReader, count: int) -> list[list[Reply]]:
    reads: list[list[Reply]] = []
    deadline = time.monotonic() + 3 * T
    while sum(len(r) for r in reads) < count:
        assert time.monotonic() < deadline, f"only {sum(len(r) for r in reads)} of {count}"
        replies = await reader.read(512)
        if replies:
            reads.append(replies)
    return reads


async def test_replies_come_many_per_read_in_order(
    redis_server: RedisServer, subscribed: aioredis.client.PubSub
) -> None:
    reader = BulkReader(subscribed, keepalive=30, answer_timeout=5)
    assert reader.bulk
    publisher = aioredis.Redis.from_url(redis_server.url)
    try:
        async with publisher.pipeline(transaction=False) as pipe:
            for n in range(2000):
                pipe.publish(CHANNEL, f"{n}-0 line {n}")
            await pipe.execute()
    finally:
        await publisher.aclose()
    reads = await read_until(reader, 2001)  # the subscription's confirmation first
    replies = [r for read in reads for r in read]
    assert replies[0] == ("subscribe", CHANNEL, 1)
    assert [(kind, channel) for kind, channel, _ in replies[1:]] == [("message", CHANNEL)] * 2000
    assert [data for _, _, data in replies[1:]] == [f"{n}-0 line {n}".encode() for n in range(2000)]
    # A read takes what has come, up to most: far fewer reads than replies.
    assert max(len(read) for read in reads) <= 512
    assert len(reads) <= 100


async def test_an_error_reply_comes_after_the_replies_before_it(
    subscribed: aioredis.client.PubSub,
) -> None:
    reader = BulkReader(subscribed, keepalive=30, answer_timeout=5)
    assert subscribed.connection is not None
    # Sent together, answered together: a PONG, then an error.
    await subscribed.connection.send_packed_command(
        subscribed.connection.pack_commands([("PING",), ("NO-SUCH-COMMAND",)])
    )
    replies: list[Reply] = []
    with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
        while True:
            replies += await reader.read(512)
    assert replies[-1] == ("pong", "", None)
    assert ("subscribe", CHANNEL, 1) in replies


async def test_a_quiet_server_is_pinged_and_a_frozen_one_called_dead(
    redis_server: RedisServer, subscribed: aioredis.client.PubSub
) -> None:
    reader = BulkReader(subscribed, keepalive=0.2, answer_timeout=0.3)
    # Quiet but alive: PINGed every 0.2 s, answered, never called dead.
    pongs = 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        pongs += sum(kind == "pong" for kind, _, _ in await reader.read(512))
    assert pongs >= 2
    # Frozen: the PING goes unanswered, and the connection is called dead soon after.
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError, match="not even to PING"):
            while time.monotonic() - started < 3 * T:
                await reader.read(512)
        assert time.monotonic() - started < 2
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)


async def publish(url: str, bodies: list[str]) -> None:
    publisher = aioredis.Redis.from_url(url)
    try:
        async with publisher.pipeline(transaction=False) as pipe:
            for body in bodies:
                pipe.publish(CHANNEL, body)
            await pipe.execute()
    finally:
        await publisher.aclose()


async def test_run_hands_replies_to_the_sink_as_they_come_until_the_link_breaks(
    redis_server: RedisServer, subscribed: aioredis.client.PubSub
) -> None:
    reader = BulkReader(subscribed, keepalive=30, answer_timeout=5)
    got: list[Reply] = []
    calls = 0
    enough = asyncio.Event()

    def sink(replies: list[Reply]) -> None:
        nonlocal calls
        calls += 1
        got.extend(replies)
        if len(got) >= 1001:
            enough.set()

    running = asyncio.create_task(reader.run(sink, 512))
    await publish(redis_server.url, [f"{n}-0 line {n}" for n in range(1000)])
    async with asyncio.timeout(3 * T):
        await enough.wait()
    assert got[0] == ("subscribe", CHANNEL, 1)
    assert [data for _, _, data in got[1:]] == [f"{n}-0 line {n}".encode() for n in range(1000)]
    assert calls < 1000  # many replies per call
    assert not running.done()
    # The server drops the connection: run() ends with a connection error, promptly.
    killer = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await killer.client_kill_filter(_type="pubsub") == 1
    finally:
        await killer.aclose()
    with pytest.raises(redis.exceptions.ConnectionError, match="closed"):
        async with asyncio.timeout(T):
            await running


async def test_a_failing_sink_is_logged_and_the_replies_after_it_still_come(
    redis_server: RedisServer,
    subscribed: aioredis.client.PubSub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reader = BulkReader(subscribed, keepalive=30, answer_timeout=5)
    got: list[bytes] = []
    boomed, second = asyncio.Event(), asyncio.Event()

    def sink(replies: list[Reply]) -> None:
        for kind, _, data in replies:
            if kind != "message":
                continue
            if data == b"boom":
                boomed.set()
                raise RuntimeError("a bug in the sink")
            got.append(data)
            second.set()

    running = asyncio.create_task(reader.run(sink, 512))
    try:
        await publish(redis_server.url, ["boom"])
        async with asyncio.timeout(3 * T):
            await boomed.wait()
        await publish(redis_server.url, ["after"])
        async with asyncio.timeout(3 * T):
            await second.wait()
        assert got == [b"after"]
        assert "unexpected error handling" in caplog.text
        assert not running.done()
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        reader.close()


async def test_run_ends_with_an_error_reply_after_handing_over_those_before_it(
    subscribed: aioredis.client.PubSub,
) -> None:
    reader = BulkReader(subscribed, keepalive=30, answer_timeout=5)
    got: list[Reply] = []
    running = asyncio.create_task(reader.run(got.extend, 512))
    assert subscribed.connection is not None
    await subscribed.connection.send_packed_command(
        subscribed.connection.pack_commands([("PING",), ("NO-SUCH-COMMAND",)])
    )
    with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
        async with asyncio.timeout(T):
            await running
    assert got[-1] == ("pong", "", None)
    assert ("subscribe", CHANNEL, 1) in got
