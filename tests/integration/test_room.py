"""The wire protocol's numbered points (PROTOCOL.md), on real Redis and real gateways.

Each test starts its own redis-server and three chat-gateway processes; users are spread
over the gateways so that every relay crosses Redis.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from tests.conftest import Cluster
from tests.support import ChatClient, T, flood_past, run_cli

pytestmark = pytest.mark.integration


async def sync_on(marker_sender: ChatClient, *readers: ChatClient) -> list[list[str]]:
    """Send a marker message and read every reader up to it. Room events are totally
    ordered through Redis, so anything published before the marker has been read."""
    marker = f"marker-{time.monotonic_ns()}"
    await marker_sender.send(marker)
    want = f"{marker_sender.name}: {marker}"
    return [await r.expect(want) for r in readers]


# 1. On connect the server sends one prompt line asking for a name.
async def test_prompt_on_connect(cluster: Cluster) -> None:
    """A new connection gets exactly the prompt line first, before sending anything."""
    await cluster.start(1)
    client = await cluster.connect(0)
    assert await client.readline() == "* Choose a name:"


# 2. Names: valid forms, uniqueness cluster-wide, case-insensitive, atomic.
async def test_invalid_name_gets_reason_and_new_prompt(cluster: Cluster) -> None:
    """An invalid name is refused with a `! ` line and a new prompt; the connection stays."""
    await cluster.start(1)
    client = await cluster.connect(0)
    assert await client.readline() == "* Choose a name:"
    for bad in ("two words", "x" * 33, "star*", ""):
        await client.send(bad)
        assert (await client.readline()).startswith("! invalid name:")
        assert await client.readline() == "* Choose a name:"
    await client.send("José_1.x-y")
    assert (await client.readline()).startswith("* Welcome, José_1.x-y! 1 user online.")


async def test_taken_name_refused_across_gateways_case_insensitively(cluster: Cluster) -> None:
    """A name held on one gateway is refused on another in any case; the client retries."""
    await cluster.start(2)
    await cluster.user(0, "Alice")
    client = await cluster.connect(1)
    assert await client.readline() == "* Choose a name:"
    await client.send("ALICE")
    assert await client.readline() == "! the name ALICE is taken; choose another"
    assert await client.readline() == "* Choose a name:"
    await client.send("Bob")
    assert await client.readline() == (
        "* Welcome, Bob! 2 users online. Type /help for commands, sair or /quit to leave."
    )


async def test_racing_claims_have_exactly_one_winner(cluster: Cluster) -> None:
    """Three clients on three gateways claiming the same names at once: one winner each."""
    await cluster.start(3)
    names = [f"racer{i}" for i in range(15)]
    clients = [[await cluster.connect(g) for g in range(3)] for _ in names]
    for row in clients:
        for c in row:
            assert await c.readline() == "* Choose a name:"

    async def claim(client: ChatClient, name: str) -> bool:
        await client.send(name.upper() if id(client) % 2 else name)
        line = await client.readline()
        assert line.startswith(("* Welcome", "! the name")), line
        return line.startswith("* Welcome")

    results = await asyncio.gather(
        *(claim(c, name) for name, row in zip(names, clients, strict=True) for c in row)
    )
    wins = [sum(results[3 * i : 3 * i + 3]) for i in range(len(names))]
    assert wins == [1] * len(names)


# 3. Every other user, on every gateway, gets `* NAME joined the chat`.
async def test_join_announced_to_everyone_else(cluster: Cluster) -> None:
    """A join is announced once to users on every gateway, and not to the joiner itself."""
    await cluster.start(3)
    alice = await cluster.user(0, "alice")
    bob = await cluster.user(1, "bob")
    assert await alice.readline() == "* bob joined the chat"
    carol = await cluster.user(2, "carol")
    assert await alice.readline() == "* carol joined the chat"
    assert await bob.readline() == "* carol joined the chat"
    seen = await sync_on(carol, alice, bob, carol)
    assert seen[2] == ["carol: " + seen[2][-1].split(": ", 1)[1]]  # nothing before it
    assert all(len(lines) == 1 for lines in seen)


# 4. `NAME: TEXT` to everyone, sender included; one order for all; senders' order kept.
async def test_messages_reach_everyone_including_sender(cluster: Cluster) -> None:
    """A line from one gateway's user reaches all users on all gateways as `NAME: TEXT`."""
    await cluster.start(3)
    users = [await cluster.user(i, n) for i, n in enumerate(["ana", "bia", "caio"])]
    for i, u in enumerate(users):
        await u.expect(lambda line: line == "* caio joined the chat") if i < 2 else None
    await users[1].send("olá, tudo bem?  ")
    for u in users:
        assert await u.readline() == "bia: olá, tudo bem?  "


async def test_one_order_for_every_recipient(cluster: Cluster) -> None:
    """Concurrent senders on three gateways: every recipient sees the same sequence, and
    each sender's lines in the order sent."""
    await cluster.start(3, "--rate-limit", "0")
    users = [await cluster.user(i, f"u{i}") for i in range(3)]
    await users[0].expect("* u2 joined the chat")
    await users[1].expect("* u2 joined the chat")
    per_sender = 40

    async def send_all(u: ChatClient) -> None:
        for n in range(per_sender):
            await u.send(f"{u.name} line {n}")

    async def receive_all(u: ChatClient) -> list[str]:
        return [await u.readline() for _ in range(3 * per_sender)]

    received = await asyncio.gather(*(receive_all(u) for u in users), *(send_all(u) for u in users))
    sequences = received[:3]
    assert sequences[0] == sequences[1] == sequences[2]
    for u in users:
        mine = [line for line in sequences[0] if line.startswith(f"{u.name}: ")]
        assert mine == [f"{u.name}: {u.name} line {n}" for n in range(per_sender)]


# 5. `sair` or `/quit`: goodbye and close; others get one leave notice.
@pytest.mark.parametrize("word", ["sair", "/quit", "SAIR"])
async def test_quit_says_goodbye_and_announces_leave_once(cluster: Cluster, word: str) -> None:
    """Quitting gets a `* ` goodbye and a close; users on other gateways see one leave."""
    await cluster.start(3)
    alice = await cluster.user(0, "alice")
    bob = await cluster.user(1, "bob")
    carol = await cluster.user(2, "carol")
    await alice.expect("* carol joined the chat")
    await bob.expect("* carol joined the chat")
    await bob.send(word)
    assert await bob.readline() == "* Goodbye, bob!"
    assert await bob.at_eof()
    for other in (alice, carol):
        assert await other.readline() == "* bob left the chat"
    for lines in await sync_on(carol, alice, carol):
        assert len(lines) == 1, lines  # the marker only: no second leave notice


# 6. EOF or reset without `sair`: the others get the leave within 2 s.
@pytest.mark.parametrize("how", ["eof", "reset"])
async def test_vanishing_client_announced_within_2s(cluster: Cluster, how: str) -> None:
    """A client that closes its socket or resets it is announced as left within 2 s."""
    await cluster.start(2)
    alice = await cluster.user(0, "alice")
    bob = await cluster.user(1, "bob")
    await alice.expect("* bob joined the chat")
    started = time.monotonic()
    if how == "eof":
        bob.writer.close()
    else:
        bob.reset()
    await alice.expect("* bob left the chat", timeout=2.0)
    assert time.monotonic() - started < 2.0
    lines = (await sync_on(alice, alice))[0]
    assert lines == [lines[-1]]  # no second leave notice


# 7. A gateway killed with SIGKILL: its users are announced as left once, within 15 s.
async def test_sigkilled_gateway_users_reaped_once(cluster: Cluster) -> None:
    """After SIGKILL of one gateway, users on each survivor see one leave per victim
    within 15 s; the names are free again and chat-admin stops listing them."""
    await cluster.start(3)
    alice = await cluster.user(0, "alice")
    carol = await cluster.user(2, "carol")
    victims = [await cluster.user(1, "bob"), await cluster.user(1, "dave")]
    await alice.expect("* dave joined the chat")
    await carol.expect("* dave joined the chat")
    del victims
    started = time.monotonic()
    cluster.gateways[1].signal(signal.SIGKILL)
    assert await cluster.gateways[1].wait(T) == -signal.SIGKILL
    for survivor in (alice, carol):
        lines = await survivor.expect(
            lambda line: line in ("* bob left the chat", "* dave left the chat"), timeout=15
        )
        first = lines[-1]
        other = "* dave left the chat" if first == "* bob left the chat" else "* bob left the chat"
        await survivor.expect(other, timeout=15)
    assert time.monotonic() - started < 15
    # Exactly once: no further leave notice before a marker sent after the reap.
    for lines in await sync_on(alice, alice, carol):
        assert not any("left the chat" in line for line in lines), lines
    # The names are free again, and chat-admin agrees.
    await cluster.name_free("bob")
    await cluster.user(0, "BOB")
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", cluster.redis.url, "who", "--json"
    )
    assert status == 0, err
    assert sorted(u["name"] for u in json.loads(out)) == ["BOB", "alice", "carol"]
    # One survivor reaped the dead gateway; the other found nothing left to reap.
    reaps = [
        line
        for g in (cluster.gateways[0], cluster.gateways[2])
        for line in (g.log.lines if g.log else [])
        if "gateway gw-2 stopped renewing" in line
    ]
    assert len(reaps) == 1, reaps


# 8. `/who` lists every online user cluster-wide; chat-admin agrees.
async def test_who_lists_everyone_and_admin_agrees(cluster: Cluster) -> None:
    """`/who` on any gateway lists users of all gateways, as `chat-admin who --json` does."""
    await cluster.start(3)
    names = ["Zoë", "adam", "Bruno", "chen"]
    users = [await cluster.user(i % 3, n) for i, n in enumerate(names)]
    await users[2].expect("* chen joined the chat")
    await users[2].send("/who")
    lines = await users[2].expect("*   Zoë")
    assert lines == ["* 4 users online:", "*   adam", "*   Bruno", "*   chen", "*   Zoë"]
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", cluster.redis.url, "who", "--json"
    )
    assert status == 0, err
    listed = json.loads(out)
    assert sorted(u["name"] for u in listed) == sorted(names)
    by_name = {u["name"]: u["gateway"] for u in listed}
    assert by_name == {n: f"gw-{i % 3 + 1}" for i, n in enumerate(names)}


# 9. Unknown `/command`: a `! ` line. Empty lines are ignored.
async def test_unknown_command_and_empty_lines(cluster: Cluster) -> None:
    """An unknown command gets a `! ` line; empty and blank lines produce nothing."""
    await cluster.start(1)
    alice = await cluster.user(0, "alice")
    await alice.send("/dance now")
    assert await alice.readline() == "! unknown command /dance; type /help for the list"
    await alice.send(b"\n\r\n   \n\t\nstill here\n")
    assert await alice.readline() == "alice: still here"


# 10. A line over 4096 bytes: a `! ` line; the connection keeps working.
async def test_overlong_line_refused_connection_kept(cluster: Cluster) -> None:
    """A 4097-byte line is refused with a `! ` line; a 4096-byte line and later ones pass."""
    await cluster.start(2)
    alice = await cluster.user(0, "alice")
    bob = await cluster.user(1, "bob")
    await alice.expect("* bob joined the chat")
    await alice.send("y" * 100_000)
    assert await alice.readline() == "! line too long: at most 4096 bytes; it was not sent"
    await alice.send("x" * 4096)
    await alice.send("after")
    for u in (alice, bob):
        assert await u.readline() == "alice: " + "x" * 4096
        assert await u.readline() == "alice: after"


# 11. Invalid UTF-8 and control characters.
async def test_invalid_utf8_and_controls_are_neutralised(cluster: Cluster) -> None:
    """Bad bytes become U+FFFD, controls never reach anyone, the sender stays connected,
    and everything received is valid UTF-8 (ChatClient decodes strictly)."""
    await cluster.start(2)
    alice = await cluster.user(0, "alice")
    bob = await cluster.user(1, "bob")
    await alice.expect("* bob joined the chat")
    await alice.send(b"caf\xc3 \xff\xfe ok\n")
    await alice.send("red \x1b[31mtext\x1b[0m\x07 tab\there del\x7f c1\u009b end".encode())
    for u in (alice, bob):
        assert await u.readline() == "alice: caf\ufffd \ufffd\ufffd ok"
        assert await u.readline() == "alice: red [31mtext[0m tab\there del c1 end"
    await alice.send("still connected")
    assert await bob.readline() == "alice: still connected"


# 12. A client that stops reading delays no one else and is disconnected past 1 MiB.
async def test_stalled_reader_is_cut_without_delaying_others(cluster: Cluster) -> None:
    """A user that stops reading is disconnected (leave announced) once its queue passes
    the bound, while the others keep receiving everything in order."""
    await cluster.start(2, "--rate-limit", "0")
    watcher = await cluster.user(0, "watcher")
    flooder = await cluster.user(1, "flooder")
    stalled = await cluster.connect(0, rcvbuf=4096)
    await stalled.login("stalled")  # and never reads again
    await flood_past("stalled", watcher, flooder)
    assert await stalled.at_eof(2 * T)
    assert any("stopped reading" in line for line in cluster.gateways[0].log.lines)  # type: ignore[union-attr]


# SIGTERM: clients told, leaves announced, presence removed, exit 0 within 10 s.
async def test_sigterm_drains_gateway(cluster: Cluster) -> None:
    """SIGTERM: each client gets a `* ` line and a close, users elsewhere see their leaves
    once, presence is cleared, and the gateway exits 0 within 10 s."""
    await cluster.start(2)
    alice = await cluster.user(0, "alice")
    bob = await cluster.user(1, "bob")
    carol = await cluster.user(1, "carol")
    await alice.expect("* carol joined the chat")
    await bob.expect("* carol joined the chat")
    await bob.send("last words")
    await alice.expect("bob: last words")
    started = time.monotonic()
    cluster.gateways[1].signal(signal.SIGTERM)
    for victim in (bob, carol):
        lines = await victim.expect(lambda line: line.startswith("* Server restarting"))
        assert await victim.at_eof()
        assert not any("left the chat" in line for line in lines)
    assert await cluster.gateways[1].wait(10) == 0
    assert time.monotonic() - started < 10
    left = await alice.expect(lambda line: "left" in line)
    left += await alice.expect(lambda line: "left" in line)
    assert sorted(left) == ["* bob left the chat", "* carol left the chat"]
    lines = (await sync_on(alice, alice))[0]
    assert len(lines) == 1, lines
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", cluster.redis.url, "who", "--json"
    )
    assert status == 0, err
    assert [u["name"] for u in json.loads(out)] == ["alice"]


async def test_telnet_crlf_lines(cluster: Cluster) -> None:
    """A telnet client ending lines with CRLF logs in and chats; no CR reaches anyone."""
    await cluster.start(2)
    bob = await cluster.user(1, "bob")
    telnet = await cluster.connect(0)
    assert await telnet.readline() == "* Choose a name:"
    await telnet.send(b"tel\r\n")
    assert (await telnet.readline()).startswith("* Welcome, tel! 2 users online.")
    assert await bob.readline() == "* tel joined the chat"
    await telnet.send(b"hi there\r\n")
    assert await bob.readline() == "tel: hi there"
    assert await telnet.readline() == "tel: hi there"
    await telnet.send(b"sair\r\n")
    assert await telnet.readline() == "* Goodbye, tel!"
    assert await bob.readline() == "* tel left the chat"
