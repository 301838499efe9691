"""Stopping a gateway: prompt, with users still on it, whatever its tasks are doing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker import RedisBroker
from gateway.config import GatewayConfig
from gateway.server import Gateway
from tests.support import ChatClient, T, port_of


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    """Started here and stopped here, in the fixture's own tasks (as a service would be:
    the stop comes from elsewhere than the start)."""
    gw = Gateway(GatewayConfig(host="127.0.0.1", port=0, history=0), RedisBroker.embedded())
    await gw.start()
    yield gw
    async with asyncio.timeout(T):
        await gw.shutdown()


async def test_stops_promptly_with_a_user_connected(gateway: Gateway) -> None:
    """The leave published at the stop wakes the room subscription just as it is
    cancelled; on Python 3.11 fakeredis's wait_for can lose that cancellation, which
    must not keep the gateway from stopping (the fixture's stop is bounded)."""
    client = await ChatClient.connect(port_of(gateway))
    await client.login("alice")
    assert gateway.rooms.members() == 1  # the stop below comes with alice in the room


async def test_cancel_outlasts_a_task_that_swallows_a_cancellation() -> None:
    """Gateway._cancel cancels again a task that carried on after the first cancel."""
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(10 * T)
        except asyncio.CancelledError:
            swallowed.set()  # carries on, as a wait_for that lost the cancellation does
        await asyncio.sleep(10 * T)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)  # let it start
    async with asyncio.timeout(T):
        await Gateway._cancel({task})
    assert swallowed.is_set() and task.cancelled()
