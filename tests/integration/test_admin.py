"""chat-admin against real gateways and Redis: who, gateways, kick, announce."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Cluster
from tests.support import run_cli

pytestmark = pytest.mark.integration


async def admin(cluster: Cluster, *args: str) -> tuple[int, str, str]:
    return await run_cli("chat-admin", "--redis-url", cluster.redis.url, *args)


async def test_who_table(cluster: Cluster) -> None:
    """`who` prints an aligned table: name, room, gateway, connected since, idle time."""
    await cluster.start(2)
    alice = await cluster.user(0, "alice")
    await cluster.user(1, "bob")
    await alice.send("hi")
    await alice.expect("alice: hi")
    status, out, err = await admin(cluster, "who")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ROOM", "GATEWAY", "CONNECTED", "SINCE", "IDLE"]
    assert lines[1].split()[:3] == ["alice", "#lobby", "gw-1"]
    assert lines[2].split()[:3] == ["bob", "#lobby", "gw-2"]
    assert lines[-1] == "2 user(s) online"
    assert lines[0].index("GATEWAY") == lines[1].index("gw-1") == lines[2].index("gw-2")
    assert lines[1].split()[-1].endswith("s")


async def test_who_json_idle_tracks_last_message(cluster: Cluster) -> None:
    """`who --json` has name, gateway, since and idle seconds for each user."""
    await cluster.start(1)
    await cluster.user(0, "alice")
    status, out, err = await admin(cluster, "who", "--json")
    assert status == 0, err
    (user,) = json.loads(out)
    assert user["name"] == "alice"
    assert user["gateway"] == "gw-1"
    assert user["since"].endswith("+00:00")
    assert 0 <= user["idle_seconds"] < 30


async def test_gateways_lists_live_gateways(cluster: Cluster) -> None:
    """`gateways` lists each live gateway with its address, user count, uptime and the
    age of its last heartbeat; a stopped one disappears."""
    await cluster.start(2)
    await cluster.user(0, "alice")
    await cluster.user(0, "bob")
    await cluster.user(1, "carol")
    status, out, err = await admin(cluster, "gateways", "--json")
    assert status == 0, err
    listed = {g["id"]: g for g in json.loads(out)}
    assert set(listed) == {"gw-1", "gw-2"}
    assert listed["gw-1"]["users"] == 2
    assert listed["gw-2"]["users"] == 1
    assert listed["gw-1"]["address"] == f"127.0.0.1:{cluster.gateways[0].port}"
    assert 0 <= listed["gw-1"]["heartbeat_age_seconds"] < 5
    assert listed["gw-1"]["uptime_seconds"] >= 0
    status, out, _ = await admin(cluster, "gateways")
    assert status == 0
    assert out.splitlines()[0].split() == ["GATEWAY", "ADDRESS", "USERS", "UPTIME", "HEARTBEAT"]
    await cluster.gateways[1].stop()
    status, out, _ = await admin(cluster, "gateways", "--json")
    assert [g["id"] for g in json.loads(out)] == ["gw-1"]


async def test_kick_disconnects_with_reason_and_announces_leave(cluster: Cluster) -> None:
    """`kick NAME --reason` makes the gateway holding NAME tell it why and disconnect it;
    users on other gateways see the leave; the name is free again."""
    await cluster.start(2)
    alice = await cluster.user(0, "alice")
    mallory = await cluster.user(1, "Mallory")
    await alice.expect("* Mallory joined the chat")
    status, out, err = await admin(cluster, "kick", "mallory", "--reason", "spamming")
    assert status == 0, err
    assert out.strip() == "kicked Mallory from gw-2"
    assert await mallory.expect(lambda line: line.startswith("! ")) == [
        "! removed by an operator: spamming"
    ]
    assert await mallory.at_eof()
    assert await alice.readline() == "* Mallory left the chat"
    await cluster.name_free("mallory")
    await cluster.user(0, "mallory")


async def test_kick_unknown_name_fails(cluster: Cluster) -> None:
    """Kicking a name nobody holds: a clear message on stderr and a non-zero exit."""
    await cluster.start(1)
    status, out, err = await admin(cluster, "kick", "nobody")
    assert status == 1
    assert out == ""
    assert err.strip() == "chat-admin: no user named 'nobody' is online"


async def test_announce_reaches_every_gateway(cluster: Cluster) -> None:
    """`announce TEXT` shows `* [admin] TEXT` to every user on every gateway."""
    await cluster.start(3)
    users = [await cluster.user(i, f"u{i}") for i in range(3)]
    await users[0].expect("* u2 joined the chat")
    await users[1].expect("* u2 joined the chat")
    status, _, err = await admin(cluster, "announce", "maintenance", "at", "noon\x1b[2J")
    assert status == 0, err
    for u in users:
        assert await u.readline() == "* [admin] maintenance at noon[2J"


async def test_announce_empty_refused(cluster: Cluster) -> None:
    """An announcement with no visible text is refused."""
    await cluster.start(1)
    status, _, err = await admin(cluster, "announce", " \x07 ")
    assert status == 1
    assert err.strip() == "chat-admin: nothing to announce"


async def test_help_is_complete() -> None:
    """Every command has --help text."""
    for command in ("who", "gateways", "kick", "announce"):
        status, out, _ = await run_cli("chat-admin", command, "--help")
        assert status == 0
        assert "Usage: chat-admin" in out
    status, out, _ = await run_cli("chat-admin", "--help")
    assert "never expose it" in out
