"""A gateway's recovery after Redis lost its data, when a step of it fails on the way.

The leaves of users who went while Redis was away can only be announced by their
gateway: Redis forgot them, so no release finds them. These tests break the recovery
(or the announcement) once and check that the retry still announces every such leave,
exactly once, in the room the user was in. The gateway runs in-process on the embedded
broker with its liveness loop idle, so that the test alone decides when recovery runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from broker import BrokerUnavailable, RedisBroker
from chatwire.names import DEFAULT_ROOM_KEY, room_key
from gateway.config import GatewayConfig
from gateway.server import Gateway
from tests.support import ChatClient, T, port_of


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    config = GatewayConfig(host="127.0.0.1", port=0, history=0, heartbeat_interval=3600.0)
    gw = Gateway(config, RedisBroker.embedded())
    await gw.start()
    yield gw
    await gw.shutdown()


async def user(gateway: Gateway, name: str) -> ChatClient:
    client = await ChatClient.connect(port_of(gateway))
    await client.login(name)
    return client


class FailOnce:
    """Makes ``target.method`` raise BrokerUnavailable on its next call only."""

    def __init__(self, target: Any, method: str) -> None:
        self.calls = 0
        self.called = asyncio.Event()
        real: Callable[..., Any] = getattr(target, method)

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.called.set()
            if self.calls == 1:
                raise BrokerUnavailable(f"{method}: injected failure")
            return await real(*args, **kwargs)

        setattr(target, method, flaky)


async def leave_while_redis_is_away(
    gateway: Gateway, leaver: ChatClient, failing: str = "leave"
) -> None:
    """``leaver`` hangs up while Redis cannot be reached (its release fails at the broker
    call ``failing``: the room leave, its first step, by default); then Redis comes back
    empty."""
    release = FailOnce(gateway.broker, failing)
    await leaver.close()
    async with asyncio.timeout(T):
        await release.called.wait()
    await gateway.publisher.drain()
    await gateway.broker._commands.flushall()


async def recover(gateway: Gateway) -> None:
    """What the liveness loop does once a heartbeat says the registration was lost."""
    await gateway.liveness.recover()
    gateway.publisher.retry_releases()
    await gateway.publisher.drain()


async def seen_once(observer: ChatClient, line: str) -> None:
    """``line`` reaches ``observer``, and only once before the observer's next message."""
    seen = await observer.expect(line)
    await observer.send("marker")
    seen += await observer.expect(f"{observer.name}: marker")
    assert seen.count(line) == 1, seen


async def test_a_failed_recovery_is_retried_with_the_same_verdict(gateway: Gateway) -> None:
    """Restoring fails after the new epoch was read: the retry still knows Redis lost
    its data and announces the outage's leave."""
    observer = await user(gateway, "observer")
    alice = await user(gateway, "alice")
    await observer.expect("* alice joined the chat")
    await leave_while_redis_is_away(gateway, alice)

    FailOnce(gateway.broker, "restore_gateway")
    with pytest.raises(BrokerUnavailable):
        await gateway.liveness.recover()
    await recover(gateway)

    await seen_once(observer, "* alice left the chat")
    assert await gateway.broker.members(DEFAULT_ROOM_KEY) == ["observer"]


async def test_a_failed_forced_leave_is_retried_as_forced(gateway: Gateway) -> None:
    """Announcing an outage's leave fails once: the retry announces it (a plain release
    would find nobody and announce nothing), and only once."""
    observer = await user(gateway, "observer")
    alice = await user(gateway, "alice")
    await observer.expect("* alice joined the chat")
    await leave_while_redis_is_away(gateway, alice)

    force = FailOnce(gateway.broker, "force_leave")
    await recover(gateway)
    assert force.calls == 2  # failed in recovery, retried with the other releases

    await seen_once(observer, "* alice left the chat")


async def test_an_outage_leave_is_announced_in_the_users_room(gateway: Gateway) -> None:
    """A user who left another room while Redis was away is announced as left in that
    room, once, and the room is gone with its last member."""
    observer = await user(gateway, "observer")
    alice = await user(gateway, "alice")
    for client in (observer, alice):
        await client.send("/join #math")
        await client.expect(lambda line: line.startswith("* You are in #math now"))
    await observer.expect("* alice joined #math")
    await leave_while_redis_is_away(gateway, alice)

    await recover(gateway)

    await seen_once(observer, "* alice left the chat")
    assert await gateway.broker.members(room_key("#math")) == ["observer"]
    assert [(p.name, p.room_key) for p in await gateway.broker.online()] == [
        ("observer", room_key("#math"))
    ]


async def test_a_leave_announced_before_the_outage_is_not_announced_again(
    gateway: Gateway,
) -> None:
    """The leave reached Redis but the name's release did not, then Redis lost its data:
    the recovery does not announce that leave again."""
    observer = await user(gateway, "observer")
    alice = await user(gateway, "alice")
    await observer.expect("* alice joined the chat")
    await leave_while_redis_is_away(gateway, alice, failing="release")

    await recover(gateway)

    await seen_once(observer, "* alice left the chat")


async def test_a_recovery_cut_short_after_registering_is_finished_by_the_next_beat(
    gateway: Gateway,
) -> None:
    """Redis fails again after the registration was restored but before the rooms were:
    the next heartbeat succeeds, yet the recovery is finished all the same, and the
    outage's leave is announced once."""
    observer = await user(gateway, "observer")
    alice = await user(gateway, "alice")
    await observer.expect("* alice joined the chat")
    await leave_while_redis_is_away(gateway, alice)

    FailOnce(gateway.broker, "enter")
    assert await gateway.liveness.beat()  # the recovery fails in its rooms step
    assert await gateway.broker.members(DEFAULT_ROOM_KEY) == []
    assert await gateway.broker.heartbeat(gateway.id, gateway.instance, 5.0)  # registered
    assert await gateway.liveness.beat()
    await gateway.publisher.drain()

    await seen_once(observer, "* alice left the chat")
    assert await gateway.broker.members(DEFAULT_ROOM_KEY) == ["observer"]


async def test_a_user_gone_while_the_recovery_waits_its_turn_is_announced(
    gateway: Gateway,
) -> None:
    """Redis lost its data; the recovery waits behind other work; meanwhile a user hangs
    up, so its release queues behind the recovery: the recovery restores that user too,
    and its release then announces the leave, once."""
    observer = await user(gateway, "observer")
    alice = await user(gateway, "alice")
    await observer.expect("* alice joined the chat")
    await gateway.broker._commands.flushall()  # Redis restarted empty

    hold = asyncio.Event()
    busy = asyncio.create_task(gateway.publisher.exclusive(hold.wait))  # work ahead of it
    recovery = asyncio.create_task(gateway.liveness.recover())
    queued = asyncio.Event()
    release = gateway.publisher.release

    def noting_release(*args: Any, **kwargs: Any) -> None:
        release(*args, **kwargs)
        queued.set()

    gateway.publisher.release = noting_release  # type: ignore[method-assign]
    await alice.close()
    async with asyncio.timeout(T):
        await queued.wait()  # alice's release is queued behind the recovery
    hold.set()
    async with asyncio.timeout(T):
        await asyncio.gather(busy, recovery)
        await gateway.publisher.drain()

    await seen_once(observer, "* alice left the chat")
    assert [p.name for p in await gateway.broker.online()] == ["observer"]
