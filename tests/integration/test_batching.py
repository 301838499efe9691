"""Batching under load on real chat-gateway processes sharing a real Redis: a room carrying
more than 500 messages a second (or ``--batch-rate``) is written in far fewer, fuller
writes, every line still reaching everyone once and in order; a room of people is never
held back."""

from __future__ import annotations

import asyncio

import pytest

from gateway.batching import RATE_PERIOD
from tests.conftest import Cluster
from tests.metrics_support import scrape
from tests.support import ChatClient, T

pytestmark = pytest.mark.integration

#: A bot's flood: LINES lines in CHUNK-line writes, one every TICK seconds (1,000 a second).
LINES, CHUNK, TICK = 1000, 10, 0.01
WINDOW = 0.05


async def flood(client: ChatClient, chunk: int = CHUNK) -> None:
    """LINES lines, ``chunk`` every TICK seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n in range(0, LINES, chunk):
        await client.send("".join(f"bot line {i}\n" for i in range(n, min(n + chunk, LINES))))
        await asyncio.sleep(max(0.0, start + (n // chunk + 1) * TICK - loop.time()))


async def read_all(client: ChatClient) -> list[str]:
    """Read the flood's lines (skipping notices) until the last."""
    got: list[str] = []
    async with asyncio.timeout(3 * T):
        while len(got) < LINES:
            line = await client.readline()
            if line.startswith("bot: "):
                got.append(line)
    return got


@pytest.mark.parametrize("window", [WINDOW, 0.0])
async def test_a_flooded_room_is_written_in_batches_and_a_chatting_one_never_waits(
    cluster: Cluster, window: float
) -> None:
    """People chatting leave the batch counter at 0. Then a bot floods the room at 1,000
    lines a second: with a 50 ms window, every member on either gateway gets every line
    once and in order, in at most a third of the writes a line-by-line room would take,
    and both gateways count batches that waited; with no window, none waits."""
    gw1, gw2 = await cluster.start(
        2, "--health-port", "0", "--rate-limit", "0", "--batch-window", str(window)
    )
    ana = await cluster.user(0, "ana")
    bob = await cluster.user(1, "bob")
    await ana.expect("* bob joined the chat")
    for n in range(5):
        await ana.send(f"hi {n}")
        await bob.expect(f"ana: hi {n}")
        await bob.send(f"hello {n}")
        await ana.expect(f"bob: hello {n}")
    before = [await scrape(gw.health_port) for gw in (gw1, gw2)]
    assert [s.value("chat_batches_delayed_total") for s in before] == [0, 0]

    bot = await cluster.user(0, "bot")
    for client in (ana, bob):
        await client.expect("* bot joined the chat")
    written_before = before[1].value("chat_delivery_latency_seconds_count")
    loop = asyncio.get_running_loop()
    start = loop.time()
    _, ana_got, bob_got = await asyncio.gather(flood(bot), read_all(ana), read_all(bob))
    took = loop.time() - start  # from the first line sent to the last one read
    want = [f"bot: bot line {i}" for i in range(LINES)]
    assert ana_got == want
    assert bob_got == want

    after = [await scrape(gw.health_port) for gw in (gw1, gw2)]
    delivered = [a.value("chat_deliveries_total") - b.value("chat_deliveries_total")
                 for a, b in zip(after, before, strict=True)]  # fmt: skip
    assert delivered == [2 * LINES, LINES]  # to ana and the bot (its echo), and to bob
    delayed = [s.value("chat_batches_delayed_total") for s in after]
    # gw2 hosts only bob: one write to him per batch, each observed once.
    writes = after[1].value("chat_delivery_latency_seconds_count") - written_before
    if window:
        assert all(d > 0 for d in delayed), delayed
        # A write per chunk until the room is seen busy (a rate period, and a little for
        # the bus), then one per window; line by line would be one per chunk throughout.
        most = (RATE_PERIOD + 0.05) / TICK + took / WINDOW + 2
        assert writes <= most < LINES / CHUNK * 0.6, (writes, most)
    else:
        assert delayed == [0, 0]
        assert delayed == [0, 0]


@pytest.mark.parametrize("batch_rate", [None, "100"])
async def test_a_lower_batch_rate_batches_a_room_the_default_leaves_alone(
    cluster: Cluster, batch_rate: str | None
) -> None:
    """300 lines a second, under the default batch rate: written as they come, nothing
    waits. With ``--batch-rate 100`` the same room is busy: written in batches, every line
    still reaching bob on the other gateway once and in order."""
    extra = ["--batch-rate", batch_rate] if batch_rate else []
    _, gw2 = await cluster.start(
        2, "--health-port", "0", "--rate-limit", "0", "--batch-window", str(WINDOW), *extra
    )
    bob = await cluster.user(1, "bob")
    bot = await cluster.user(0, "bot")
    await bob.expect("* bot joined the chat")
    before = await scrape(gw2.health_port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    _, bob_got = await asyncio.gather(flood(bot, chunk=3), read_all(bob))
    took = loop.time() - start
    assert bob_got == [f"bot: bot line {i}" for i in range(LINES)]
    after = await scrape(gw2.health_port)
    writes = after.value("chat_delivery_latency_seconds_count") - before.value(
        "chat_delivery_latency_seconds_count"
    )
    delayed = after.value("chat_batches_delayed_total")
    chunks = -(-LINES // 3)
    if batch_rate:
        assert delayed > 0
        most = (RATE_PERIOD + 0.05) / TICK + took / WINDOW + 2
        assert writes <= most < chunks * 0.6, (writes, most)
    else:
        assert delayed == 0
        assert writes >= chunks * 0.6, writes  # about one per chunk the bot sent
