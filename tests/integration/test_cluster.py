"""The chat on a real Redis Cluster (README, "Scaling and high availability"): rooms on
sharded pub/sub, each on the node owning its slot; a slot migrated and a primary killed
under load, with nothing lost or shown twice.

Every gateway here is pointed at a different node: each finds the cluster by itself.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import pytest

from broker import RedisBroker
from tests.load_support import (
    LOAD_FLAGS,
    LeanClient,
    MessageLog,
    check_exactly_once,
    close_all,
    gateway_logs,
    load_room,
    log_in_all,
    settle_room,
    users_in,
    who_names,
)
from tests.support import ChatClient, GatewayProcess, T, run_cli
from tests.topologies import ClusterFixture, RedisNode, room_log_key, slot_of

pytestmark = pytest.mark.integration


def channel_of(room: str) -> str:
    return f"chat:room:{{{room}}}:bus"


async def start_gateways(cluster: ClusterFixture, *extra: str) -> list[GatewayProcess]:
    """One gateway per node given, each pointed at its own node."""
    primaries = await cluster.primaries()
    gateways = [GatewayProcess(f"gw-{n + 1}", node.url, *extra) for n, node in enumerate(primaries)]
    await asyncio.gather(*(g.start() for g in gateways))
    return gateways


async def stop_all(gateways: list[GatewayProcess]) -> None:
    await asyncio.gather(*(g.stop() for g in gateways))
    for gateway in gateways:
        gateway.assert_no_traceback()


@pytest.fixture
async def redis_cluster() -> AsyncIterator[ClusterFixture]:
    cluster = ClusterFixture(primaries=3)
    await cluster.start()
    yield cluster
    await cluster.close()


@pytest.fixture
async def redis_cluster_with_replicas() -> AsyncIterator[ClusterFixture]:
    cluster = ClusterFixture(primaries=3, replicas=1)
    await cluster.start()
    yield cluster
    await cluster.close()


async def shard_subscribers(node: RedisNode) -> list[int]:
    """Sharded subscriptions per client connection subscribed to any on ``node``."""
    listing = await node.call("CLIENT", "LIST")
    return sorted(int(n) for n in re.findall(r"\bssub=(\d+)", listing) if int(n))


async def shard_listing(node: RedisNode) -> str:
    """Who is subscribed to what on ``node``, for a failing assertion's message."""
    listing = await node.call("CLIENT", "LIST")
    subscribers = re.findall(r"\bname=(\S*) .*\bssub=([1-9]\d*)", listing)
    channels = await node.call("PUBSUB", "SHARDCHANNELS")
    return f"connections {subscribers}, channels {channels}"


async def join(client: ChatClient, room: str) -> None:
    await client.send(f"/join {room}")
    await client.expect(lambda line: line.startswith(f"* You are in {room} now"))


async def test_rooms_live_on_the_nodes_owning_their_slots(redis_cluster: ClusterFixture) -> None:
    """Three rooms, one per primary, with a user of each room on each of three gateways
    (each pointed at another node): every room's traffic reaches exactly its members, and
    is published and subscribed on its own node only, one connection per gateway and node
    whatever the number of rooms there."""
    gateways = await start_gateways(redis_cluster)
    clients: list[ChatClient] = []
    try:
        for gateway in gateways:
            await gateway.log.wait_for(r"is a Redis Cluster node: using the cluster")
        rooms = await redis_cluster.rooms_per_primary()
        members: dict[str, list[ChatClient]] = {}
        for r, room in enumerate(rooms.values()):
            for g, gateway in enumerate(gateways):
                client = await ChatClient.connect(gateway.port)
                clients.append(client)
                await client.login(f"u{r}{g}")
                await join(client, room)
                members.setdefault(room, []).append(client)
        for room, users in members.items():
            for user in users:
                await user.send(f"hello {room}")
            want = {f"{u.name}: hello {room}" for u in users}
            for user in users:
                seen: set[str] = set()

                def all_said(line: str, seen: set[str] = seen, want: set[str] = want) -> bool:
                    if ": hello " in line:
                        assert line in want and line not in seen, line  # theirs, once
                        seen.add(line)
                    return seen == want

                await user.expect(all_said)

        for node, room in rooms.items():
            # The room's channel is on its node, with one subscriber per gateway, and on
            # no other node.
            numsub = await node.call("PUBSUB", "SHARDNUMSUB", channel_of(room))
            assert numsub == [channel_of(room), 3]
            for other in rooms:
                if other is not node:
                    listed = await other.call("PUBSUB", "SHARDCHANNELS", "chat:room:*")
                    assert channel_of(room) not in listed
        # A second room on a node already carrying one goes on the same connection.
        node, room = next(iter(rooms.items()))
        before = await shard_subscribers(node)
        assert len(before) == 3, before  # one connection per gateway
        owners = await redis_cluster.slot_owners()
        second = next(
            f"#s{n}" for n in range(10_000) if owners[slot_of(room_log_key(f"#s{n}"))] is node
        )
        newcomer = await ChatClient.connect(gateways[2].port)
        clients.append(newcomer)
        await newcomer.login("newcomer")
        await join(newcomer, second)
        after = await shard_subscribers(node)
        # Still one connection per gateway; gw-3's now carries one more channel.
        assert len(after) == 3 and sum(after) == sum(before) + 1, (before, after)

        # A private message crosses gateways; /rooms and chat-admin see the whole cluster.
        sender, recipient = members[room][0], members[room][2]
        await sender.send(f"/msg {recipient.name} psst")
        await recipient.expect(f"(private) {sender.name}: psst")
        status, out, err = await run_cli("chat-admin", "--redis-url", node.url, "rooms")
        assert status == 0, err
        for listed in rooms.values():
            assert listed in out
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        await stop_all(gateways)


async def test_a_room_left_and_entered_again_at_once_is_left_for_good(
    redis_cluster: ClusterFixture,
) -> None:
    """Two rooms of one node subscribed at once share one connection; a room left,
    entered again before its node answered the leaving, then left again ends with no
    subscription there. (Concurrent first subscriptions once opened two connections and
    lost a confirmation; taking that first answer for a slot move once lost track of the
    room, which stayed subscribed for the gateway's life.)"""
    owners = await redis_cluster.slot_owners()
    # A node without the gateways' inboxes, so that its one connection carries rooms only.
    node = next(p for p in await redis_cluster.primaries() if p is not owners[slot_of("{chat}")])
    room, other, third = [r for r in (f"#r{n}" for n in range(10_000))
                          if owners[slot_of(room_log_key(r))] is node][:3]  # fmt: skip
    broker = await RedisBroker.connect(redis_cluster.url)
    try:
        async with broker.subscription("gw-1", [room, other]) as subscription:
            await subscription.remove(room)
            await subscription.add(room)
            await subscription.remove(room)
            # Answers come in order on the node's one connection: once `third` is
            # confirmed there, the last leaving has been answered too.
            await subscription.add(third)
            assert await node.call("PUBSUB", "SHARDNUMSUB", channel_of(room)) == [
                channel_of(room),
                0,
            ]
            assert await shard_subscribers(node) == [2], await shard_listing(node)
    finally:
        await broker.close()


async def test_a_login_storm_on_a_cluster_waits_its_turn(redis_cluster: ClusterFixture) -> None:
    """300 logins at once on one gateway: far more commands in flight than connections a
    node (32), yet every login gets in, queued as on one Redis, none refused."""
    gateways = await start_gateways(redis_cluster, *LOAD_FLAGS)
    users: list[LeanClient] = []
    try:
        users = await log_in_all(gateways, [(0, f"s{n}") for n in range(300)], concurrency=300)
        assert len(await who_names(redis_cluster.url)) == 300
    finally:
        await close_all(users)
        await stop_all(gateways)


async def test_a_busy_rooms_slot_migrates_under_load(redis_cluster: ClusterFixture) -> None:
    """A room's slot moves to another primary while two users talk in it: the gateways
    are told (sunsubscribe), subscribe on the new owner and replay the gap, so every member
    sees every line once, in order. A room on a third node goes on untouched."""
    gateways = await start_gateways(redis_cluster, *LOAD_FLAGS)
    try:
        rooms = await redis_cluster.rooms_per_primary()
        (source, busy), (target, _), (_, calm) = list(rooms.items())
        busy_users = await users_in(gateways, busy, "b")
        calm_users = await users_in(gateways, calm, "c")
        log = MessageLog()
        talk = asyncio.gather(load_room(busy_users[:2], log), load_room(calm_users[:1], log))
        await busy_users[2].wait_until(lambda: len(busy_users[2].msg_ids) >= 50, 3 * T)
        await redis_cluster.move_slot(slot_of(room_log_key(busy)), target)
        await talk
        await settle_room(busy_users, busy_users[:2])
        await settle_room(calm_users, calm_users[:1])
        check_exactly_once(busy_users, log, busy_users[:2])
        check_exactly_once(calm_users, log, calm_users[:1])
        assert all(not u.refused for u in busy_users + calm_users)
        for gateway in gateways:
            watcher = gateway.log
            await watcher.wait_for(re.escape(f"{channel_of(busy)} left ") + ".*its slot moved")
            assert not any(channel_of(calm) in line for line in watcher.lines)
            assert not any("bus subscription lost" in line for line in watcher.lines)
        assert await redis_cluster.owner_of(room_log_key(busy)) is target
        del source
    finally:
        await close_all(busy_users + calm_users)
        await stop_all(gateways)


@pytest.mark.parametrize("victim_role", ["primary", "replica"])
async def test_a_node_killed_under_load_loses_nothing(
    redis_cluster_with_replicas: ClusterFixture, victim_role: str
) -> None:
    """SIGKILL of the primary holding a busy room (its replica takes over), or of that
    replica (which the gateways read the room from): the gateways carry on with the
    node left, subscribing there again and replaying the gap where they must. Every line
    is delivered to every member once, in order, or refused with `! `; the service is
    back within 10 s; a room on another node never notices."""
    cluster = redis_cluster_with_replicas
    rooms = await cluster.rooms_per_primary()
    (owner, busy), (_, calm), *_ = list(rooms.items())
    (replica,) = await cluster.replicas_of(owner)
    victim = owner if victim_role == "primary" else replica
    survivors = [p for p in await cluster.primaries() if p is not owner]
    gateways = [GatewayProcess(f"gw-{n + 1}", survivors[n % 2].url, *LOAD_FLAGS) for n in range(3)]
    await asyncio.gather(*(g.start() for g in gateways))
    busy_users: list[LeanClient] = []
    calm_users: list[LeanClient] = []
    try:
        busy_users = await users_in(gateways, busy, "b")
        calm_users = await users_in(gateways, calm, "c")
        log = MessageLog()
        talk = asyncio.gather(load_room(busy_users[:2], log), load_room(calm_users[:1], log))
        await busy_users[2].wait_until(lambda: len(busy_users[2].msg_ids) >= 50, 3 * T)
        # Each gateway reads the room on the replica, in one connection.
        assert await shard_subscribers(replica) == [1, 1, 1], await shard_listing(replica)
        await cluster.kill(victim)
        killed_at = time.monotonic()
        if victim is owner:
            await cluster.wait_failover(victim)
        await talk
        # Back within 10 s of the kill: a line said once the cluster has settled goes
        # through (the gateways found the node left by themselves).
        marker = busy_users[0].say(log)
        assert marker is not None
        assert await busy_users[0].wait_until(lambda: marker in busy_users[0].echoes, 3 * T)
        assert busy_users[0].echoes[marker] - killed_at < 10
        await settle_room(busy_users, busy_users[:2])
        await settle_room(calm_users, calm_users[:1])
        try:
            check_exactly_once(busy_users, log, busy_users[:2])
            check_exactly_once(calm_users, log, calm_users[:1])
        except AssertionError as exc:  # what the gateways did, for whoever reads this
            raise AssertionError(f"{exc}\n{gateway_logs(gateways)}") from exc
        for gateway in gateways:
            if victim_role == "replica":  # it was read there: read again on the primary
                await gateway.log.wait_for(re.escape(f"subscribed to {channel_of(busy)} again"))
            assert not any(channel_of(calm) in line for line in gateway.log.lines)
        if victim_role == "primary":
            # The old primary comes back as a replica: the gateways move their reading of
            # the room onto it by themselves (they read the cluster's map every 5 s), and
            # the room's talk goes on without a loss.
            await cluster.restart(victim)
            talk = asyncio.gather(load_room(busy_users[:2], log, count=600))
            async with asyncio.timeout(6 * T):
                while await shard_subscribers(victim) != [1, 1, 1]:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            await talk
            await settle_room(busy_users, busy_users[:2])
            check_exactly_once(busy_users, log, busy_users[:2])
    finally:
        await close_all(busy_users + calm_users)
        await stop_all(gateways)
