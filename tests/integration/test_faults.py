"""Faults a deployment sees, injected into real Redis and real gateways: nothing is lost."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
import redis.asyncio as aioredis

from broker import keys
from tests.conftest import Cluster
from tests.support import GatewayProcess, RedisServer, T, TcpProxy, run_cli
from tests.topologies import poll

pytestmark = pytest.mark.integration

DOWN = "* The message service is unavailable: nothing you send is delivered until it is back."
BACK = "* The message service is back."


async def test_link_cut_loses_nothing(cluster: Cluster) -> None:
    """A gateway's link to Redis is cut for 2 s while users elsewhere send 200 messages:
    when it returns, that gateway's users have all 200, in order, without duplicates."""
    await cluster.start(1, "--rate-limit", "0")
    proxy = TcpProxy(cluster.redis.port)
    await proxy.start()
    cut_gateway = GatewayProcess("gw-cut", proxy.url)
    cluster.gateways.append(cut_gateway)
    try:
        await cut_gateway.start()
        sender = await cluster.user(0, "sender")
        receivers = [await cluster.user(1, "r1"), await cluster.user(1, "r2")]
        await sender.expect("* r2 joined the chat")
        await receivers[0].expect("* r2 joined the chat")

        await proxy.cut()
        for n in range(200):
            await sender.send(f"message {n:03d}")
        await sender.expect("sender: message 199")  # all 200 are in Redis now
        await asyncio.sleep(2)  # the fault lasts 2 s
        await proxy.start()

        expected = [f"sender: message {n:03d}" for n in range(200)]
        for receiver in receivers:
            lines = await receiver.expect("sender: message 199", timeout=6 * T)
            chat = [line for line in lines if not line.startswith("* ")]
            assert chat == expected
        await sender.send("after the cut")
        for receiver in receivers:
            lines = await receiver.expect("sender: after the cut")
            assert [line for line in lines if not line.startswith("* ")] == [
                "sender: after the cut"
            ]
        assert cut_gateway.log is not None
        assert any("replaying" in line for line in cut_gateway.log.lines)
    finally:
        await proxy.close()


async def test_an_outage_longer_than_the_liveness_ttl_reaps_only_the_dead(
    cluster: Cluster,
) -> None:
    """Every gateway loses Redis for longer than the liveness TTL, so every liveness key
    lapses, and one gateway dies meanwhile. The links come back one at a time: the first
    gateway back does not reap the others, which are merely late, so nobody is announced
    as leaving or joining; the dead one's user is announced as left, once, after the grace
    (one TTL)."""
    redis = cluster.redis
    assert isinstance(redis, RedisServer)
    proxies = [TcpProxy(redis.port) for _ in range(3)]
    for proxy in proxies:
        await proxy.start()
    gateways = [
        GatewayProcess(f"gw-{n + 1}", proxy.url, "--rate-limit", "0")
        for n, proxy in enumerate(proxies)
    ]
    cluster.gateways += gateways
    await asyncio.gather(*(g.start() for g in gateways))
    direct = aioredis.Redis.from_url(redis.url)
    alive = [keys.gateway_alive(g.gateway_id) for g in gateways]
    try:
        alice = await cluster.user(0, "alice")
        bob = await cluster.user(1, "bob")
        await cluster.user(2, "dan")
        for user in (alice, bob):
            await user.expect("* dan joined the chat")

        for proxy in proxies:
            await proxy.cut()
        gateways[2].signal(signal.SIGKILL)
        assert await gateways[2].wait(T) == -signal.SIGKILL

        async def lapsed() -> bool:
            return not await direct.exists(*alive)

        await poll(lapsed, 3 * T, "every liveness key lapsed")
        await proxies[0].start()
        last_ttl, renewals = 0, 0

        async def renewed_twice() -> bool:
            # A renewal resets the key's time to live. After the second one, the reap that
            # followed the first is done.
            nonlocal last_ttl, renewals
            ttl = await direct.pttl(alive[0])
            renewals += ttl > last_ttl
            last_ttl = ttl
            return renewals >= 2

        await poll(renewed_twice, 3 * T, "gw-1 renewed its liveness twice", every=0.02)
        await proxies[1].start()

        async def late_one_renewed() -> bool:
            return bool(await direct.exists(alive[1]))

        await poll(late_one_renewed, 3 * T, "gw-2 renewed its liveness")
        for user in (alice, bob):
            lines = await user.expect("* dan left the chat", timeout=4 * T)
            assert all(line in (DOWN, BACK, "* dan left the chat") for line in lines), lines
        assert await who(cluster) == {"alice": "gw-1", "bob": "gw-2"}
        await alice.send("after the outage")
        for user in (alice, bob):
            lines = await user.expect("alice: after the outage")
            assert lines == ["alice: after the outage"]  # no second leave, no join
    finally:
        await direct.aclose()
        for proxy in proxies:
            await proxy.close()


async def test_redis_restart_keeps_clients_and_refuses_to_pretend(cluster: Cluster) -> None:
    """Redis stops for a few seconds and comes back empty: clients stay connected and are
    told; lines sent meanwhile are refused with a `! ` line, not silently lost; new logins
    are refused with a new prompt; afterwards presence is restored without join notices
    and the room works again."""
    await cluster.start(2)
    alice = await cluster.user(0, "alice")
    bob = await cluster.user(1, "bob")
    dave = await cluster.user(1, "dave")
    await alice.expect("* dave joined the chat")
    await bob.expect("* dave joined the chat")

    await cluster.redis.stop()
    assert await alice.readline(3 * T) == DOWN
    assert await bob.readline(3 * T) == DOWN
    await dave.close()  # leaves while Redis is away: its leave is owed, not forgotten
    await alice.send("anyone there?")
    assert await alice.readline(3 * T) == (
        "! not delivered: the chat service is unavailable; try again"
    )
    newcomer = await cluster.connect(1)
    assert await newcomer.readline() == "* Choose a name:"
    await newcomer.send("carol")
    assert await newcomer.readline(3 * T) == (
        "! the chat service is unavailable right now; try again in a moment"
    )
    assert await newcomer.readline() == "* Choose a name:"

    await cluster.redis.start()  # same port, empty
    # Whichever gateway recovers first: both hear that the service is back and, once,
    # that dave left.
    for client in (alice, bob):
        assert sorted([await client.readline(6 * T), await client.readline(6 * T)]) == [
            "* The message service is back.",
            "* dave left the chat",
        ]
    for gateway in cluster.gateways:
        assert gateway.log is not None
        await gateway.log.wait_for("registration lost; registering again", timeout=6 * T)
    users = await who(cluster)
    assert sorted(users) == ["alice", "bob"]

    await newcomer.send("carol")
    assert (await newcomer.readline()).startswith("* Welcome, carol! 3 users online.")
    await alice.send("back to normal")
    for client in (alice, bob):
        lines = await client.expect("alice: back to normal")
        # bob and alice never left, so nobody is told they joined; carol did join.
        assert lines == ["* carol joined the chat", "alice: back to normal"]


async def who(cluster: Cluster) -> dict[str, str]:
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", cluster.redis.url, "who", "--json"
    )
    assert status == 0, err
    return {u["name"]: u["gateway"] for u in json.loads(out)}


async def test_history_on_join_and_on_demand(cluster: Cluster) -> None:
    """A joiner first sees the last messages, marked as history, then the live room;
    /history N shows the last N on demand."""
    await cluster.start(2, "--history", "3")
    alice = await cluster.user(0, "alice")
    for n in range(5):
        await alice.send(f"old {n}")
    await alice.expect("alice: old 4")
    bob = await cluster.connect(1)
    welcome = await bob.login("bob")
    assert welcome.startswith("* Welcome, bob!")
    history = [await bob.readline() for _ in range(3)]
    assert [line.split("] ", 1)[1] for line in history] == [
        "alice: old 2",
        "alice: old 3",
        "alice: old 4",
    ]
    assert all(line.startswith("* [history ") and " UTC] " in line for line in history)
    await alice.send("live")
    assert await bob.readline() == "alice: live"
    await bob.send("/history 2")
    lines = [await bob.readline() for _ in range(2)]
    assert [line.split("] ", 1)[1] for line in lines] == ["alice: old 4", "alice: live"]
    await bob.send("/history 1000")
    assert await bob.readline() == "! usage: /history [N], N from 1 to 100"


async def test_no_history_when_turned_off(cluster: Cluster) -> None:
    """--history 0: a joiner gets no past messages."""
    await cluster.start(1, "--history", "0")
    alice = await cluster.user(0, "alice")
    await alice.send("before")
    await alice.expect("alice: before")
    bob = await cluster.user(0, "bob")
    await alice.send("after")
    assert await bob.readline() == "alice: after"


async def test_empty_room_history(cluster: Cluster) -> None:
    """/history in a room with no messages says so."""
    await cluster.start(1)
    alice = await cluster.user(0, "alice")
    await alice.send("/history")
    assert await alice.readline() == "* No messages to show."


async def test_redis_restarted_with_its_append_only_file_keeps_history_and_presence() -> None:
    """Redis with an append-only file (as compose runs it) restarts under load: the rooms'
    history is still there, presence stays true, nothing sent before the stop is lost or
    shown twice, and nobody is announced as joining or leaving."""
    redis = RedisServer(persistent=True)
    await redis.start()
    cluster = Cluster(redis)
    try:
        await cluster.start(2, "--rate-limit", "0")
        alice = await cluster.user(0, "alice")
        bob = await cluster.user(1, "bob")
        carol = await cluster.user(1, "carol")
        await carol.send("/join #math")
        await carol.expect(lambda line: line.startswith("* You are in #math"))
        await carol.send("math before")
        await carol.expect("carol: math before")
        await alice.send("".join(f"load {n}\n" for n in range(200)).encode())
        for user in (alice, bob):
            await user.expect("alice: load 199")

        await redis.stop()  # a clean stop writes the file out; the start reads it back
        await redis.start()
        await alice.send("after the restart")
        for user in (alice, bob):
            lines = await user.expect("alice: after the restart", timeout=6 * T)
            assert all(line in (DOWN, BACK, "alice: after the restart") for line in lines), (
                lines
            )  # no join, no leave, no message again
        users = await who(cluster)
        assert sorted(users) == ["alice", "bob", "carol"]

        dan = await cluster.user(0, "dan")
        await dan.send("/history 3")
        history = await dan.expect(lambda line: "UTC] alice: after the restart" in line)
        assert [h.split("UTC] ")[1] for h in history[-3:]] == [
            "alice: load 198", "alice: load 199", "alice: after the restart",
        ]  # fmt: skip
        await dan.send("/join #math")
        lines = await dan.expect(lambda line: line.endswith("UTC] carol: math before"))
        assert "* You are in #math now: 2 users here." in lines
    finally:
        await cluster.close()
        await redis.close()
