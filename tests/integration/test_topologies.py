"""The Redis Cluster and Sentinel fixtures themselves: they start, move slots, fail over and
come back as the tests built on them assume."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from tests.support import T
from tests.topologies import ClusterFixture, SentinelFixture, room_log_key, slot_of

pytestmark = pytest.mark.integration

MakeCluster = Callable[[int, int], Awaitable[ClusterFixture]]


@pytest.fixture
async def make_cluster() -> AsyncIterator[MakeCluster]:
    """Starts a cluster of the size a test asks for; closes it after the test."""
    made: list[ClusterFixture] = []

    async def make(primaries: int = 3, replicas: int = 0) -> ClusterFixture:
        cluster = ClusterFixture(primaries, replicas)
        made.append(cluster)
        await cluster.start()
        return cluster

    yield make
    await asyncio.gather(*(c.close() for c in made))


@pytest.fixture
async def sentinel() -> AsyncIterator[SentinelFixture]:
    fixture = SentinelFixture()
    try:
        await fixture.start()
        yield fixture
    finally:
        await fixture.close()


async def test_a_cluster_starts_with_three_primaries_and_serves(make_cluster: MakeCluster) -> None:
    """Three primaries share the slots; a cluster client reaches a key on each of them."""
    cluster = await make_cluster(3, 0)
    primaries = await cluster.primaries()
    assert len(primaries) == 3
    rooms = await cluster.rooms_per_primary()
    assert set(rooms) == set(primaries)
    client = RedisCluster.from_url(cluster.url, decode_responses=True)
    try:
        for primary, room in rooms.items():
            key = room_log_key(room).replace(":log", ":name")
            assert await cluster.owner_of(key) is primary
            await client.set(key, room)
            assert await client.get(key) == room
            assert await primary.call("GET", key) == room  # it really lives there
    finally:
        await client.aclose()


async def test_moving_a_slot_moves_its_stream(make_cluster: MakeCluster) -> None:
    """A slot holding a room's stream migrates to another primary; the entries follow, and a
    cluster client that knew the old owner finds them at the new one."""
    cluster = await make_cluster(3, 0)
    key = room_log_key("#math")
    source = await cluster.owner_of(key)
    target = next(p for p in await cluster.primaries() if p is not source)
    client = RedisCluster.from_url(cluster.url, decode_responses=True)
    try:
        ids = [await client.xadd(key, {"n": str(n)}) for n in range(5)]
        await cluster.move_slot(slot_of(key), target)
        assert await cluster.owner_of(key) is target
        assert await source.call("CLUSTER", "COUNTKEYSINSLOT", slot_of(key)) == 0
        entries = await client.xrange(key)
        assert [(i, f["n"]) for i, f in entries] == [(i, str(n)) for n, i in enumerate(ids)]
        await client.xadd(key, {"n": "5"})
        assert await target.call("XLEN", key) == 6
    finally:
        await client.aclose()


async def test_moving_a_slot_unsubscribes_its_sharded_subscribers(
    make_cluster: MakeCluster,
) -> None:
    """Redis (7.0 on) tells a sharded subscriber when its channel's slot leaves the node: a
    ``sunsubscribe`` arrives, unasked, once the source learns of the new owner."""
    cluster = await make_cluster(3, 0)
    channel = "chat:room:{#math}:bus"
    source = await cluster.owner_of(channel)
    target = next(p for p in await cluster.primaries() if p is not source)
    await source.call("XADD", room_log_key("#math"), "*", "n", "0")
    async with source.client() as plain:
        pubsub = plain.pubsub()
        await pubsub.ssubscribe(channel)
        assert (await pubsub.get_message(timeout=T))["type"] == "ssubscribe"
        await cluster.move_slot(slot_of(channel), target)
        message = await pubsub.get_message(timeout=T)
        assert message == {"type": "sunsubscribe", "pattern": None, "channel": channel, "data": 0}
        await pubsub.aclose()


async def test_a_cluster_fails_over_when_a_primary_dies(make_cluster: MakeCluster) -> None:
    """In a 3+3 cluster, a killed primary's replica takes over its slots with what was
    replicated before the kill; a cluster client carries on; the old primary comes back as
    the new one's replica."""
    cluster = await make_cluster(3, 1)
    key = room_log_key("#math")
    victim = await cluster.owner_of(key)
    [replica] = await cluster.replicas_of(victim)
    client = RedisCluster.from_url(cluster.url, decode_responses=True)
    try:
        ids = [await client.xadd(key, {"n": str(n)}) for n in range(3)]
        async with victim.client() as direct, direct.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"n": "3"})  # WAIT counts this connection's writes
            pipe.execute_command("WAIT", 1, int(T * 1000))
            last_id, acked = await pipe.execute()
        assert acked == 1
        await cluster.kill(victim)
        heir = await cluster.wait_failover(victim)
        assert heir is replica
        assert await cluster.owner_of(key) is heir
        entries = await client.xrange(key)
        assert [i for i, _ in entries] == [*ids, last_id]
        await client.xadd(key, {"n": "4"})
        assert await client.xlen(key) == 5
        await cluster.restart(victim)
        assert await victim.role() == "slave"
        assert await cluster.replicas_of(heir) == [victim]
        async with victim.client() as direct, direct.pipeline(transaction=False) as pipe:
            pipe.execute_command("READONLY")  # a cluster replica serves reads only when asked
            pipe.xlen(key)
            assert await pipe.execute() == [True, 5]
    finally:
        await client.aclose()


async def test_sentinels_fail_over_and_the_old_primary_returns_as_replica(
    sentinel: SentinelFixture,
) -> None:
    """Killing the primary promotes the replica within a few seconds, with what was
    replicated before the kill; a Sentinel-aware client follows; the killed primary, started
    again, is made a replica of the new one and syncs."""
    old_primary, old_replica = sentinel.primary, sentinel.replica
    sentinels = Sentinel(sentinel.sentinel_addresses, socket_timeout=T)
    client = sentinels.master_for(sentinel.service, decode_responses=True, socket_timeout=T)
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("before", "kill")
            pipe.execute_command("WAIT", 1, int(T * 1000))
            assert await pipe.execute() == [True, 1]
        took = await sentinel.kill_primary()
        assert took < 4 * T
        assert sentinel.primary is old_replica and sentinel.replica is old_primary
        assert await client.get("before") == "kill"
        await client.set("after", "failover")
        assert await old_replica.call("GET", "after") == "failover"
        await sentinel.restart_old_primary()
        assert await old_primary.role() == "slave"
        assert await old_primary.call("GET", "before") == "kill"
    finally:
        await client.aclose()
