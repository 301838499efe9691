"""Nothing a user sends is lost (PROTOCOL.md item 12): flood control delays input instead of
dropping it, and a pipe delivers every line or says which it did not."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Cluster
from tests.integration.test_client import Terminal, client_cli
from tests.load_support import gateway_rss_kib
from tests.support import T

pytestmark = pytest.mark.integration


async def test_a_pipe_of_100_lines_delivers_every_line_in_order(cluster: Cluster) -> None:
    """`seq 1 100 | chat-client --name counter` with default flags: all 100 lines reach
    the room in order, and the client exits 0 once every echo is back."""
    await cluster.start(2)
    watcher = await cluster.user(1, "watcher")
    stdin = b"".join(b"%d\n" % n for n in range(1, 101))
    status, out, err = await client_cli(cluster.gateways[0].port, "--name", "counter", stdin=stdin)
    assert status == 0, err
    echoes = [line for line in out.splitlines() if line.startswith("counter: ")]
    assert echoes == [f"counter: {n}" for n in range(1, 101)]
    assert out.splitlines()[-1] == "* Goodbye, counter!"
    seen = await watcher.expect("* counter left the chat")
    assert [x for x in seen if x.startswith("counter: ")] == echoes


async def test_a_refused_line_is_named_on_stderr_with_its_own_exit_status(
    cluster: Cluster,
) -> None:
    """A line the server refuses (too long; a private message to nobody) is named on
    stderr and the client exits 4; the other lines are delivered."""
    await cluster.start(1)
    watcher = await cluster.user(0, "watcher")
    long_line = "x" * 5000
    stdin = f"before\n{long_line}\n/msg nobody hi\nafter\n".encode()
    status, out, err = await client_cli(cluster.gateways[0].port, "--name", "bot", stdin=stdin)
    assert status == 4, (out, err)
    refusals = [line for line in err.splitlines() if "not delivered" in line]
    assert len(refusals) == 2, err
    assert "xxxx" in refusals[0] and "line too long" in refusals[0]
    assert "/msg nobody hi" in refusals[1] and "no user named nobody" in refusals[1]
    assert "Traceback" not in err
    seen = await watcher.expect("* bot left the chat")
    assert [x for x in seen if x.startswith("bot: ")] == ["bot: before", "bot: after"]


async def test_a_500_line_paste_into_the_terminal_client_arrives_whole(
    cluster: Cluster,
) -> None:
    """500 lines pasted into the interactive client at once, with default flags: every
    line reaches the room, in order (at the gateway's pace)."""
    await cluster.start(1)
    watcher = await cluster.user(0, "watcher")
    term = Terminal(cluster.gateways[0].port, "paster")
    try:
        await term.wait_for("Welcome, paster!")
        await watcher.expect("* paster joined the chat")
        term.type("".join(f"pasted line {n}\r" for n in range(500)))
        # The terminal must be read meanwhile, as a person's terminal is.
        _, lines = await asyncio.gather(
            term.wait_for("paster: pasted line 499", timeout=14 * T),
            watcher.expect("paster: pasted line 499", timeout=14 * T),
        )
        assert [x for x in lines if x.startswith("paster: ")] == [
            f"paster: pasted line {n}" for n in range(500)
        ]
    finally:
        term.kill()


async def test_a_raw_flood_is_delivered_whole_in_bounded_memory(cluster: Cluster) -> None:
    """A raw socket writing 20,000 lines as fast as it can (the rate raised so that the
    flood lasts seconds, not half an hour): every line is delivered, in order, once; the
    gateway's memory stays bounded (what waits, waits in the kernel); others keep chatting
    meanwhile."""
    (gateway,) = await cluster.start(1, "--rate-limit", "2000", "--rate-burst", "100")
    watcher = await cluster.user(0, "watcher")
    flooder = await cluster.user(0, "flooder")
    await watcher.expect("* flooder joined the chat")
    before = gateway_rss_kib(gateway)
    count = 20_000
    flooder.writer.write(b"".join(b"flood %d\n" % n for n in range(count)))
    await flooder.writer.drain()
    first = await watcher.expect("flooder: flood 100")
    await watcher.send("meanwhile")
    mine = await watcher.expect("watcher: meanwhile", timeout=2 * T)
    assert f"flooder: flood {count - 1}" not in mine  # not held up behind the backlog
    peak = gateway_rss_kib(gateway)
    rest = await watcher.expect(f"flooder: flood {count - 1}", timeout=8 * T)
    flood = [x for x in first + mine + rest if x.startswith("flooder: ")]
    assert flood == [f"flooder: flood {n}" for n in range(count)]
    peak = max(peak, gateway_rss_kib(gateway))
    assert peak - before < 20 * 1024, (before, peak)  # KiB: the backlog is not buffered here
