"""GET /metrics and --log-format json on real chat-gateway processes sharing a real Redis:
what Prometheus would scrape after users logged in, chatted, were refused, slowed down
and kicked (through chat-admin), checked against exactly what the test did."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

import pytest

from chatwire.lines import MAX_LINE_BYTES
from chatwire.texts import LINE_TOO_LONG_TEXT, slow_down_text
from tests.conftest import Cluster
from tests.metrics_support import scrape
from tests.support import ChatClient, T, run_cli

pytestmark = pytest.mark.integration

#: Lines a second and burst per client: low enough that one user can be slowed down on
#: purpose, high enough that no other user of the test ever waits.
RATE, BURST = "0.5", "4"


async def until_all(client: ChatClient, wanted: set[str]) -> None:
    """Read until every line of ``wanted`` has come, in whatever order."""
    missing = set(wanted)
    async with asyncio.timeout(T):
        while missing:
            missing.discard(await client.readline())


async def test_metrics_count_what_users_did(cluster: Cluster) -> None:
    """Two gateways; alice and bob on the first, carol and mallory on the second. Mallory
    is kicked with chat-admin; alice says two lines and carol one; bob sends a line too
    long; a newcomer asks for a name that is taken; carol messages nobody; flo floods.
    Each gateway's /metrics then shows exactly that: messages received, deliveries
    (messages x local recipients), refusals by reason, logins, the kick, one flood pause,
    and gauges of who is connected."""
    gw1, gw2 = await cluster.start(
        2, "--health-port", "0", "--rate-limit", RATE, "--rate-burst", BURST
    )
    alice = await cluster.user(0, "alice")
    bob = await cluster.user(0, "bob")
    carol = await cluster.user(1, "carol")
    mallory = await cluster.user(1, "mallory")
    for client in (alice, bob, carol):
        await client.expect("* mallory joined the chat")

    status, out, err = await run_cli(
        "chat-admin", "--redis-url", cluster.redis.url, "kick", "mallory", "--reason", "spam"
    )
    assert status == 0, err
    assert out.strip() == "kicked mallory from gw-2"
    assert await mallory.expect(lambda line: line.startswith("! ")) == [
        "! removed by an operator: spam"
    ]
    for client in (alice, bob, carol):
        await client.expect("* mallory left the chat")

    await alice.send("hello 1")
    await alice.send("hello 2")
    await carol.send("hi")
    said = {"alice: hello 1", "alice: hello 2", "carol: hi"}
    for client in (alice, bob, carol):
        await until_all(client, said)

    await bob.send("x" * (MAX_LINE_BYTES + 1))
    assert await bob.readline() == f"! {LINE_TOO_LONG_TEXT}"
    newcomer = await cluster.connect(1)
    assert await newcomer.readline() == "* Choose a name:"
    await newcomer.send("ALICE")
    assert (await newcomer.readline()).startswith("! the name ALICE is taken")
    await carol.send("/msg nobody psst")
    assert await carol.readline() == "! no user named nobody is online"

    # flo's name is one line of the burst; /help lines take three more, the fifth waits.
    flo = await cluster.user(0, "flo")
    await flo.send("/help\n" * int(BURST))
    await flo.expect(f"* {slow_down_text(float(RATE))}")
    for client in (alice, bob):
        await client.expect("* flo joined the chat")

    one, two = await scrape(gw1.health_port), await scrape(gw2.health_port)
    assert one.value("chat_gateway_info", gateway="gw-1") == 1
    assert two.value("chat_gateway_info", gateway="gw-2") == 1

    assert one.value("chat_messages_received_total") == 2
    assert two.value("chat_messages_received_total") == 1
    # Three messages, each to the room's local members: alice and bob; carol alone.
    assert one.value("chat_deliveries_total") == 3 * 2
    assert two.value("chat_deliveries_total") == 3 * 1

    nothing = dict.fromkeys(
        ("too_long", "invalid", "name_taken", "not_online", "unavailable", "full", "internal"),
        0.0,
    )
    assert one.refused() == {**nothing, "too_long": 1}
    assert two.refused() == {**nothing, "name_taken": 1, "not_online": 1}

    assert one.value("chat_login_duration_seconds_count") == 3  # alice, bob, flo
    assert two.value("chat_login_duration_seconds_count") == 2  # carol, mallory
    for result in (one, two):
        logins = result.value("chat_login_duration_seconds_count")
        assert result.value("chat_login_duration_seconds_bucket", le="+Inf") == logins
        assert 0 < result.value("chat_login_duration_seconds_sum") < logins * T
        batches = result.value("chat_delivery_latency_seconds_count")
        assert batches >= 1
        assert 0 <= result.value("chat_delivery_latency_seconds_sum") < batches * T
        assert 0 <= result.value("chat_heartbeat_age_seconds") < T
        assert result.value("chat_rooms_hosted") == 1
        for counter in ("redis_errors", "bus_reconnects", "events_replayed", "slow_readers_cut"):
            assert result.value(f"chat_{counter}_total") == 0, counter

    assert one.value("chat_kicks_total") == 0
    assert two.value("chat_kicks_total") == 1
    assert one.value("chat_flood_delays_total") == 1
    assert two.value("chat_flood_delays_total") == 0

    assert one.value("chat_logged_in_users") == 3
    assert one.value("chat_connected_clients") == 3
    assert two.value("chat_logged_in_users") == 1  # carol; the newcomer has no name yet
    assert two.value("chat_connected_clients") == 2


async def test_log_format_json_makes_every_line_a_json_object(cluster: Cluster) -> None:
    """With --log-format json every line the gateway writes on stderr, from start to stop,
    is one JSON object with its time (UTC), level, logger, message and the gateway's id."""
    (gateway,) = await cluster.start(1, "--log-format", "json")
    alice = await cluster.user(0, "alice")
    await alice.send("sair")
    assert gateway.log is not None
    await gateway.log.wait_for("connection .* closed")
    await gateway.stop()
    lines = gateway.log.lines
    assert lines
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert {"time", "level", "logger", "message", "gateway"} <= set(entry), entry
        assert entry["gateway"] == "gw-1"
        assert datetime.fromisoformat(entry["time"]).utcoffset() is not None
    messages = [entry["message"] for entry in entries]
    assert any(m.startswith("listening on 127.0.0.1:") for m in messages), messages
    assert any(m.endswith("joined as alice") for m in messages), messages
    assert messages[-1] == "stopped"


async def test_log_format_text_stays_the_default(cluster: Cluster) -> None:
    """Without the flag the lines are as they were: time, level, [gateway id], logger."""
    (gateway,) = await cluster.start(1)
    assert gateway.log is not None
    listening = next(line for line in gateway.log.lines if "listening on" in line)
    assert " INFO [gw-1] gateway.server: listening on 127.0.0.1:" in listening
    with pytest.raises(json.JSONDecodeError):
        json.loads(listening)


@pytest.mark.parametrize("how", ["flag", "env"])
async def test_a_bad_log_format_is_one_clear_error(how: str) -> None:
    """A value other than text or json, as a flag or in CHAT_LOG_FORMAT, stops the gateway
    before it starts: exit status 2, no traceback, and one error line that names the
    option and its choices."""
    if how == "flag":
        status, out, err = await run_cli("chat-gateway", "--port", "0", "--log-format", "xml")
    else:
        status, out, err = await run_cli(
            "chat-gateway", "--port", "0", env={"CHAT_LOG_FORMAT": "xml"}
        )
    assert status == 2
    assert out == ""
    assert "Traceback" not in err
    (error,) = [line for line in err.splitlines() if line.startswith("Error")]
    assert "'--log-format'" in error
    assert "'xml' is not one of 'text', 'json'" in error
