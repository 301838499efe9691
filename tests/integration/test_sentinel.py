"""The chat on Redis Sentinel (README, "Scaling and high availability"): a primary, a
replica and three Sentinels on loopback; the primary is killed under load, and later comes
back as a replica.

What a message's "sent" means here: its publish was acknowledged by a replica (WAIT 1), and
the gateways read room traffic from the replica, so a line anyone saw is on the node that
Sentinel promotes. So every line whose echo its sender saw reaches every member of its room
exactly once, in order; any other line is answered with `! `.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from broker import keys
from broker.subscription import SplitSubscription
from tests.load_support import (
    BACK_NOTICE,
    DOWN_NOTICE,
    LOAD_FLAGS,
    LeanClient,
    MessageLog,
    check_exactly_once,
    close_all,
    gateway_logs,
    load_room,
    log_in,
    settle_room,
    users_in,
    who_names,
)
from tests.support import GatewayProcess, RedisServer, T
from tests.topologies import SentinelFixture

pytestmark = pytest.mark.integration


@pytest.fixture
async def sentinel() -> AsyncIterator[SentinelFixture]:
    deployment = SentinelFixture()
    await deployment.start()
    yield deployment
    await deployment.close()


@pytest.fixture
async def gateways(sentinel: SentinelFixture) -> AsyncIterator[list[GatewayProcess]]:
    started = [GatewayProcess(f"gw-{n + 1}", sentinel.url, *LOAD_FLAGS) for n in range(3)]
    await asyncio.gather(*(g.start() for g in started))
    yield started
    await asyncio.gather(*(g.stop() for g in started))
    for gateway in started:
        gateway.assert_no_traceback()


async def fail_over_under_load(
    sentinel: SentinelFixture,
    gateways: list[GatewayProcess],
    prefix: str,
    during: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[LeanClient], float]:
    """Two users talk in #math (with a third listening, one per gateway) while the
    primary is killed (``during`` runs once it is dead, before the failover); returns them
    once every line is settled, and the seconds from the kill until a line said after the
    failover came back to its sender."""
    users = await users_in(gateways, "#math", prefix)
    log = MessageLog()
    talk = asyncio.create_task(load_room(users[:2], log))
    assert await users[2].wait_until(lambda: len(users[2].msg_ids) >= 50, 3 * T)
    killed_at = time.monotonic()
    victim = sentinel.primary
    failover = asyncio.create_task(sentinel.kill_primary())
    async with asyncio.timeout(2 * T):
        while victim.alive:  # noqa: ASYNC110 (the process exit is awaited by kill_primary)
            await asyncio.sleep(0.01)
    if during is not None:
        await during()
    await failover
    await talk
    marker = users[0].say(log)
    assert marker is not None
    assert await users[0].wait_until(lambda: marker in users[0].echoes, 3 * T)
    back_after = users[0].echoes[marker] - killed_at
    await settle_room(users, users[:2])
    try:
        check_exactly_once(users, log, users[:2])
    except AssertionError as exc:  # what the gateways did, for whoever reads this
        raise AssertionError(f"{exc}\n{gateway_logs(gateways)}") from exc
    assert all(user.live for user in users)
    return users, back_after


async def test_the_primary_killed_under_load_fails_over_with_nothing_lost(
    sentinel: SentinelFixture, gateways: list[GatewayProcess]
) -> None:
    """SIGKILL of the primary while two users talk: clients stay connected, lines are
    delivered once each, in order, or answered with `! `; the service is back within
    10 s; presence stays true (a user who leaves during the outage is announced once,
    nobody else is announced leaving, nobody is left behind)."""
    for gateway in gateways:
        await gateway.log.wait_for(r"through Sentinel at 127\.0\.0\.1:")
    watcher = await log_in(gateways[1].port, 1, "watcher", track_presence=True)
    leaver = await log_in(gateways[2].port, 2, "leaver")
    assert await watcher.wait_until(lambda: "leaver" in (watcher.joins or {}), 3 * T)
    users: list[LeanClient] = []
    try:
        users, back_after = await fail_over_under_load(sentinel, gateways, "s", leaver.quit)
        assert back_after < 10, f"service back after {back_after:.1f}s"
        assert await watcher.wait_until(lambda: "leaver" in (watcher.leaves or {}), 3 * T)
        names = sorted(await who_names(sentinel.url))
        assert names == sorted(["watcher", *(u.name for u in users)])
        assert watcher.leaves == {"leaver": watcher.leaves["leaver"]}
        assert len(watcher.leaves["leaver"]) == 1
        assert all(len(times) == 1 for times in (watcher.joins or {}).values())
        for user in [watcher, *users]:
            notices = [line for _, line in user.other if line in (DOWN_NOTICE, BACK_NOTICE)]
            # If the outage was long enough to be told, its end was told too.
            assert notices in ([], [DOWN_NOTICE, BACK_NOTICE]), (user.name, notices)
    finally:
        await close_all([watcher, leaver, *users])


async def test_the_old_primary_comes_back_as_a_replica_and_can_take_over_again(
    sentinel: SentinelFixture, gateways: list[GatewayProcess]
) -> None:
    """After a failover the killed primary returns as a replica of the new one; when the
    new one is killed in turn, the returned one takes over, and again nothing is lost."""
    first, _ = await fail_over_under_load(sentinel, gateways, "a")
    await close_all(first)
    await sentinel.restart_old_primary()
    second, back_after = await fail_over_under_load(sentinel, gateways, "b")
    try:
        assert back_after < 10, f"service back after {back_after:.1f}s"
        assert sorted(await who_names(sentinel.url)) == sorted(u.name for u in second)
    finally:
        await close_all(second)


async def test_an_old_primary_back_is_not_read_before_it_is_a_replica(
    sentinel: SentinelFixture, gateways: list[GatewayProcess]
) -> None:
    """A killed primary that comes back is listed by Sentinel as a replica some ten
    seconds before Sentinel makes it one; meanwhile it is an empty primary that nothing is
    published on. A gateway subscribing then reads its rooms elsewhere (here the primary,
    the only node in sync), so its users miss nothing. (The first login also finds gw-1's
    relay pausing seconds between tries after the failover: it must not be refused for
    that, but have the subscription made again at once.)"""
    await sentinel.kill_primary()
    old = sentinel.replica
    await sentinel.return_old_primary_unconverted()
    late = GatewayProcess("gw-late", sentinel.url, *LOAD_FLAGS)
    await late.start()
    users: list[LeanClient] = []
    try:
        users = await users_in([gateways[0], late], "#math", "w")
        # Still in the window, and nothing of ours listens on the old primary.
        assert await old.role() == "master"
        listing = await old.call("CLIENT", "LIST")
        ours = [c for c in listing.splitlines() if not re.search(r"\bname=sentinel-", c)]
        assert not [c for c in ours if re.search(r"\bsub=[1-9]", c)], ours
        log = MessageLog()
        marker = users[0].say(log)
        assert marker is not None
        assert await users[1].wait_until(lambda: marker in users[1].msg_ids, 3 * T)
    finally:
        await close_all(users)
        await late.stop()
        late.assert_no_traceback()


async def test_the_rooms_connection_stays_subscribed_once_its_last_room_is_gone(
    redis_server: RedisServer,
) -> None:
    """The replica's connection carries rooms only. When its last room goes it stays
    subscribed (to the gateway's anchor channel): redis-py sends a health-check PING and
    reads its answer itself when it sends a command on a pub/sub connection with no
    subscription, racing the reader for the socket ("read() called while another coroutine
    is already waiting", seen in a failover test). The next room then goes on that same
    connection and is delivered. (A real Redis stands for both primary and replica.)"""
    primary = aioredis.Redis.from_url(redis_server.url)
    replica = aioredis.Redis.from_url(redis_server.url)
    subscription = SplitSubscription(replica.pubsub(), primary.pubsub(), "gw-1")
    try:
        await subscription.open(["#math"])
        batches = subscription.batches()
        reading = asyncio.ensure_future(anext(batches))
        await subscription.remove("#math")
        rooms_pubsub = subscription._rooms._pubsub
        async with asyncio.timeout(T):  # the reader takes Redis's confirmation
            while rooms_pubsub.pending_unsubscribe_channels:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert rooms_pubsub.subscribed
        await subscription.add("#art")
        await primary.publish(
            keys.room("#art").channel, '1-0 {"kind":"msg","name":"ana","text":"hi"}'
        )
        async with asyncio.timeout(T):
            batch = await reading
        assert [room for room, _ in batch] == ["#art"]
    finally:
        await subscription.close()
        await primary.aclose()
        await replica.aclose()
