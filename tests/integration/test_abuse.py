"""Hostile or broken input against real gateways: floods, connection limits, forgery."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Cluster
from tests.support import ChatClient, T

pytestmark = pytest.mark.integration

SLOW_DOWN = "! slow down: at most 10 lines a second; lines over the limit are not sent"


async def test_flood_is_throttled_with_one_warning(cluster: Cluster) -> None:
    """40 lines at once with the default limits: the burst of 20 is relayed, the sender
    gets one `! slow down` line, and the rest reach no one."""
    await cluster.start(2)
    watcher = await cluster.user(0, "watcher")
    flooder = await cluster.user(1, "flooder")
    await watcher.expect("* flooder joined the chat")
    flooder.writer.write(b"".join(f"line {n}\n".encode() for n in range(40)))
    await flooder.writer.drain()
    seen = await flooder.expect("flooder: line 19")
    assert seen.count(SLOW_DOWN) <= 1
    if SLOW_DOWN not in seen:
        assert await flooder.readline() == SLOW_DOWN
    await watcher.send("marker")
    lines = await watcher.expect("watcher: marker")
    assert lines == [f"flooder: line {n}" for n in range(20)] + ["watcher: marker"]
    assert (await flooder.expect("watcher: marker")).count(SLOW_DOWN) == 0


async def test_sustained_flood_disconnects(cluster: Cluster) -> None:
    """A client that keeps flooding far past the limit is disconnected, and announced."""
    await cluster.start(1)
    watcher = await cluster.user(0, "watcher")
    flooder = await cluster.user(0, "flooder")
    await watcher.expect("* flooder joined the chat")
    flooder.writer.write(b"spam\n" * 500)
    await flooder.writer.drain()
    lines = await flooder.expect("! disconnected for flooding")
    assert lines.count(SLOW_DOWN) == 1
    assert await flooder.at_eof()
    await watcher.expect("* flooder left the chat")


async def test_rate_flags_are_honoured(cluster: Cluster) -> None:
    """--rate-limit and --rate-burst set the limits: 3 lines at once pass, the 4th does not."""
    await cluster.start(1, "--rate-limit", "2", "--rate-burst", "3")
    alice = await cluster.user(0, "alice")
    alice.writer.write(b"a\nb\nc\nd\n")
    await alice.writer.drain()
    lines = await alice.expect("alice: c")
    assert "! slow down: at most 2 lines a second; lines over the limit are not sent" in (
        lines if any(line.startswith("! ") for line in lines) else [await alice.readline()]
    )
    await cluster.user(0, "bob")
    later = await alice.expect("* bob joined the chat")  # alice's lines would come before
    assert "alice: d" not in lines + later


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
