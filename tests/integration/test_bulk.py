"""Reading a subscribed connection in bulk (broker/bulk.py), on a real redis-server: many
replies per read, in order; an error reply after the replies before it; a quiet server
kept alive by PING, a frozen one called dead."""

from __future__ import annotations

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
        replies = await reader.read(0.5, 512)
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
            replies += await reader.read(0.5, 512)
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
        pongs += sum(kind == "pong" for kind, _, _ in await reader.read(0.1, 512))
    assert pongs >= 2
    # Frozen: the PING goes unanswered, and the connection is called dead soon after.
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError, match="not even to PING"):
            while time.monotonic() - started < 3 * T:
                await reader.read(0.1, 512)
        assert time.monotonic() - started < 2
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
