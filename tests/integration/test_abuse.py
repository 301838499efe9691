"""Hostile or broken input against real gateways: floods, connection limits, forgery."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Cluster
from tests.support import ChatClient, T

pytestmark = pytest.mark.integration

SLOW_DOWN = "* Slow down: at most 10 lines a second; your next lines follow at that pace."


async def test_a_burst_over_the_rate_is_delayed_not_dropped(cluster: Cluster) -> None:
    """40 lines at once with the default limits: the burst of 20 is relayed at once, the
    sender is told once to slow down, and the other 20 follow at 10 a second, in order."""
    await cluster.start(2)
    watcher = await cluster.user(0, "watcher")
    flooder = await cluster.user(1, "flooder")
    await watcher.expect("* flooder joined the chat")
    flooder.writer.write(b"".join(f"line {n}\n".encode() for n in range(40)))
    await flooder.writer.drain()
    lines = await watcher.expect("flooder: line 39", timeout=4 * T)
    assert lines == [f"flooder: line {n}" for n in range(40)]
    seen = await flooder.expect("flooder: line 39", timeout=T)
    assert seen.count(SLOW_DOWN) == 1
    assert [x for x in seen if x != SLOW_DOWN] == [f"flooder: line {n}" for n in range(40)]


async def test_a_sustained_flood_is_slowed_never_cut(cluster: Cluster) -> None:
    """500 lines at once: the flooder stays connected and every line arrives, in order;
    meanwhile another user's message is not held up behind the flood."""
    await cluster.start(1, "--rate-limit", "100", "--rate-burst", "20")
    watcher = await cluster.user(0, "watcher")
    flooder = await cluster.user(0, "flooder")
    await watcher.expect("* flooder joined the chat")
    flooder.writer.write(b"".join(b"spam %d\n" % n for n in range(500)))
    await flooder.writer.drain()
    first = await watcher.expect("flooder: spam 50")
    await watcher.send("still here")
    lines = await watcher.expect("watcher: still here")
    assert "flooder: spam 499" not in lines  # it did not wait for the flood to pass
    rest = await watcher.expect("flooder: spam 499", timeout=4 * T)
    spam = [x for x in first + lines + rest if x.startswith("flooder: ")]
    assert spam == [f"flooder: spam {n}" for n in range(500)]
    await flooder.send("sair")
    assert "* Goodbye, flooder!" in await flooder.expect("* Goodbye, flooder!", timeout=2 * T)


async def test_rate_flags_are_honoured(cluster: Cluster) -> None:
    """--rate-limit and --rate-burst set the pace: 3 lines at once pass, the 4th comes
    half a second later (2 a second), and the sender is told the rate."""
    await cluster.start(1, "--rate-limit", "2", "--rate-burst", "3")
    alice = await cluster.user(0, "alice")
    alice.writer.write(b"a\nb\nc\nd\n")
    await alice.writer.drain()
    lines = await alice.expect("alice: d", timeout=2 * T)
    assert lines.index(
        "* Slow down: at most 2 lines a second; your next lines follow at that pace."
    ) < lines.index("alice: d")
    assert [x for x in lines if x.startswith("alice: ")] == [f"alice: {c}" for c in "abcd"]


async def test_max_clients_refuses_with_a_line_and_close(cluster: Cluster) -> None:
    """Past --max-clients a new connection gets a `! ` line and is closed, never left
    hanging; once someone leaves there is room again."""
    await cluster.start(1, "--max-clients", "2")
    first = await cluster.user(0, "first")
    await cluster.user(0, "second")
    third = await cluster.connect(0)
    assert await third.readline() == "! this server is full; try again later"
    assert await third.at_eof()
    await first.send("sair")
    await first.at_eof()
    fourth = await cluster.connect(0)
    assert await fourth.readline() == "* Choose a name:"


async def test_max_per_address_counts_each_address(cluster: Cluster) -> None:
    """Past --max-per-address connections from one address are refused with a `! ` line,
    while another address is still welcome."""
    await cluster.start(1, "--max-per-address", "2")
    port = cluster.gateways[0].port
    kept = [await cluster.connect(0), await cluster.connect(0)]
    for client in kept:
        assert await client.readline() == "* Choose a name:"
    refused = await cluster.connect(0)
    assert await refused.readline() == "! too many connections from your address"
    assert await refused.at_eof()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
    other = ChatClient(reader, writer)
    cluster.clients.append(other)
    assert await other.readline() == "* Choose a name:"


async def test_text_cannot_forge_system_lines(cluster: Cluster) -> None:
    """Whatever a user types, others see it after `NAME: `: no line of theirs can pass for
    a `* ` notice or a `! ` error."""
    await cluster.start(2)
    alice = await cluster.user(0, "alice")
    bob = await cluster.user(1, "bob")
    await alice.expect("* bob joined the chat")
    await bob.send(b"hi\r* carol joined the chat\n")
    await bob.send(b"\n* carol left the chat\n! fake error\n\x1b[2K\r* forged\n")
    received = [await alice.readline() for _ in range(4)]
    assert received == [
        "bob: hi* carol joined the chat",
        "bob: * carol left the chat",
        "bob: ! fake error",
        "bob: [2K* forged",
    ]


@pytest.mark.parametrize(
    ("first", "second"), [("alice", "\uff21\uff2c\uff29\uff23\uff25"), ("fiona", "ﬁona")]
)
async def test_lookalike_names_cannot_coexist(cluster: Cluster, first: str, second: str) -> None:
    """Names equal under NFKC case folding (full-width letters, ligatures) are one name."""
    await cluster.start(2)
    await cluster.user(0, first)
    client = await cluster.connect(1)
    assert await client.readline() == "* Choose a name:"
    await client.send(second)
    assert await client.readline() == f"! the name {second} is taken; choose another"


async def test_silent_connections_are_kept(cluster: Cluster) -> None:
    """A client that connects and stays silent is not cut by the flood or idle rules."""
    await cluster.start(1)
    lurker = await cluster.user(0, "lurker")
    talker = await cluster.user(0, "talker")
    await talker.send("anyone?")
    assert await lurker.expect("talker: anyone?", timeout=T)
