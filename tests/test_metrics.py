"""The gateway's metrics (``GET /metrics``), its JSON log lines, and the monitoring files
(Grafana dashboard and provisioning, Prometheus configuration) that read them.

Gateways run in-process on the embedded broker; the counts are checked against exactly
what each test did, scraped over HTTP as Prometheus scrapes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
import yaml

from broker import BrokerUnavailable, ChatMessage, RedisBroker, Resubscribed, RoomEvent, UserJoined
from chatwire.lines import MAX_LINE_BYTES
from chatwire.texts import LINE_TOO_LONG_TEXT, slow_down_text
from gateway import relay as relay_module
from gateway.cli import JsonFormatter
from gateway.config import GatewayConfig
from gateway.metrics import LATENCY_BUCKETS, Counts, GatewayMetrics, Refusal, Snapshot
from gateway.relay import Relay
from gateway.rooms import Room, Rooms
from gateway.server import Gateway
from gateway.session import MAX_OUTGOING_BYTES, Session
from tests.metrics_support import (
    DASHBOARD,
    PROMETHEUS_YML,
    PROVISIONING,
    ROOT,
    Scrape,
    dashboard,
    dashboard_exprs,
    http_get,
    metric_names,
    scrape,
)
from tests.support import ChatClient, T, port_of
from tests.test_relay import FakeBroker, msg
from tests.test_room import FakeMember, enter, joined
from tests.test_session import FakeHub, FakeTransport

#: Every family the gateway exports under its own prefix, with its type.
CHAT_FAMILIES = {
    "chat_gateway_info": "gauge",  # an info metric is a gauge in the text format
    "chat_connected_clients": "gauge",
    "chat_logged_in_users": "gauge",
    "chat_rooms_hosted": "gauge",
    "chat_heartbeat_age_seconds": "gauge",
    "chat_messages_received": "counter",
    "chat_deliveries": "counter",
    "chat_lines_refused": "counter",
    "chat_flood_delays": "counter",
    "chat_slow_readers_cut": "counter",
    "chat_kicks": "counter",
    "chat_redis_errors": "counter",
    "chat_bus_reconnects": "counter",
    "chat_events_replayed": "counter",
    "chat_batches_delayed": "counter",
    "chat_login_duration_seconds": "histogram",
    "chat_delivery_latency_seconds": "histogram",
}


async def start(**settings: Any) -> Gateway:
    config = GatewayConfig(host="127.0.0.1", port=0, history=0, health_port=0, **settings)
    gw = Gateway(config, RedisBroker.embedded())
    await gw.start()
    return gw


@pytest.fixture
async def make_gateway() -> AsyncIterator[Callable[..., Any]]:
    """Starts gateways (with their health port) for a test and stops them after it."""
    started: list[Gateway] = []
    clients: list[ChatClient] = []

    async def make(**settings: Any) -> Gateway:
        gw = await start(**settings)
        started.append(gw)
        return gw

    make.clients = clients  # type: ignore[attr-defined]
    yield make
    for client in clients:
        await client.close()
    for gw in started:
        async with asyncio.timeout(3 * T):
            await gw.shutdown()


async def user(make: Any, gw: Gateway, name: str) -> ChatClient:
    client = await ChatClient.connect(port_of(gw))
    make.clients.append(client)
    await client.login(name)
    return client


async def connection(make: Any, gw: Gateway) -> ChatClient:
    client = await ChatClient.connect(port_of(gw))
    make.clients.append(client)
    assert await client.readline() == "* Choose a name:"
    return client


async def until_all(client: ChatClient, wanted: set[str]) -> None:
    """Read until every line of ``wanted`` has come, in whatever order."""
    missing = set(wanted)
    async with asyncio.timeout(T):
        while missing:
            missing.discard(await client.readline())


# ---- the endpoint ---------------------------------------------------------------------


async def test_metrics_are_served_in_the_prometheus_text_format(make_gateway: Any) -> None:
    """GET /metrics on the health port answers 200 with the Prometheus text format: every
    chat_ family with its type, the gateway's id, the process's figures; /health and /stats
    answer as before."""
    gw = await make_gateway()
    result = await scrape(gw.health_port)
    types = {name: f.type for name, f in result.families.items() if name.startswith("chat_")}
    assert types == CHAT_FAMILIES
    assert result.value("chat_gateway_info", gateway=gw.id) == 1
    assert set(result.refused()) == {str(reason) for reason in Refusal}
    assert result.value("process_resident_memory_bytes") > 0
    status, _, body = await http_get(gw.health_port, "/health")
    assert status == 200 and body.startswith("ok"), body
    status, headers, body = await http_get(gw.health_port, "/stats")
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["connections"] == 0


async def test_each_gateway_has_a_registry_of_its_own(make_gateway: Any) -> None:
    """Two gateways in one process: one's users and messages never show in the other's
    figures."""
    busy, idle = await make_gateway(), await make_gateway()
    alice = await user(make_gateway, busy, "alice")
    await alice.send("hello")
    await alice.expect("alice: hello")
    busy_scrape, idle_scrape = await scrape(busy.health_port), await scrape(idle.health_port)
    assert busy_scrape.value("chat_messages_received_total") == 1
    assert idle_scrape.value("chat_messages_received_total") == 0
    assert idle_scrape.value("chat_logged_in_users") == 0
    assert idle_scrape.value("chat_login_duration_seconds_count") == 0


# ---- what the counts count -------------------------------------------------------------


async def test_a_chat_is_counted_exactly(make_gateway: Any) -> None:
    """Two users log in, send four messages between them, then one leaves: messages
    received 4, deliveries 4 x 2 (the sender's echo is a delivery too), two logins, and the
    gauges follow who is connected."""
    gw = await make_gateway()
    alice = await user(make_gateway, gw, "alice")
    bob = await user(make_gateway, gw, "bob")
    await alice.expect("* bob joined the chat")
    for line in ("one", "two", "three"):
        await alice.send(line)
    await bob.send("four")
    said = {"alice: one", "alice: two", "alice: three", "bob: four"}
    await until_all(alice, said)
    await until_all(bob, said)
    result = await scrape(gw.health_port)
    assert result.value("chat_messages_received_total") == 4
    assert result.value("chat_deliveries_total") == 4 * 2
    assert result.value("chat_login_duration_seconds_count") == 2
    assert 0 < result.value("chat_login_duration_seconds_sum") < 2 * T
    assert result.value("chat_connected_clients") == 2
    assert result.value("chat_logged_in_users") == 2
    assert result.value("chat_rooms_hosted") == 1
    batches = result.value("chat_delivery_latency_seconds_count")
    assert 1 <= batches <= 6  # at most one per event: two joins, four messages
    assert result.value("chat_delivery_latency_seconds_sum") < batches * T
    assert set(result.refused().values()) == {0}

    await bob.send("sair")
    await alice.expect("* bob left the chat")
    result = await scrape(gw.health_port)
    assert result.value("chat_connected_clients") == 1
    assert result.value("chat_logged_in_users") == 1
    assert result.value("chat_login_duration_seconds_count") == 2


async def test_refusals_are_counted_by_reason(make_gateway: Any) -> None:
    """Each `! ` line is counted under its reason: an invalid name, a name taken, a line
    too long, an unknown command, /msg to nobody, a connection past --max-clients."""
    gw = await make_gateway(max_clients=2)
    first = await connection(make_gateway, gw)
    await first.send("x" * 100)
    assert (await first.readline()).startswith("! invalid name:")
    assert await first.readline() == "* Choose a name:"
    await first.send("alice")
    assert (await first.readline()).startswith("* Welcome, alice!")
    second = await connection(make_gateway, gw)
    await second.send("ALICE")
    assert (await second.readline()).startswith("! the name ALICE is taken")
    await first.send("y" * (MAX_LINE_BYTES + 1))
    assert await first.readline() == f"! {LINE_TOO_LONG_TEXT}"
    await first.send("/nosuch")
    assert (await first.readline()).startswith("! unknown command /nosuch")
    await first.send("/msg nobody hi")
    assert await first.readline() == "! no user named nobody is online"
    third = await ChatClient.connect(port_of(gw))
    make_gateway.clients.append(third)
    assert await third.readline() == "! this server is full; try again later"
    assert await third.at_eof()
    result = await scrape(gw.health_port)
    assert result.refused() == {
        "too_long": 1,
        "invalid": 2,
        "name_taken": 1,
        "not_online": 1,
        "unavailable": 0,
        "full": 1,
        "internal": 0,
    }
    assert result.value("chat_messages_received_total") == 0


async def test_redis_failures_are_counted_with_the_refusal_they_cause(
    make_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A /who that Redis cannot answer: one Redis error, one line refused as unavailable."""
    gw = await make_gateway()
    alice = await user(make_gateway, gw, "alice")

    async def down(*args: Any) -> Any:
        raise BrokerUnavailable("Error 111 connecting to redis: Connection refused")

    monkeypatch.setattr(gw.broker, "members", down)
    await alice.send("/who")
    assert (await alice.readline()).startswith("! the user list is unavailable")
    result = await scrape(gw.health_port)
    assert result.value("chat_redis_errors_total") == 1
    assert result.refused()["unavailable"] == 1


async def test_a_flood_delay_is_counted_once_per_pause(make_gateway: Any) -> None:
    """Past its burst a client's input is held back: one pause, one count, however many
    lines wait (they are not refused)."""
    gw = await make_gateway(rate_limit=0.5, rate_burst=3)
    alice = await user(make_gateway, gw, "alice")  # the name is the first of the three
    await alice.send("/help\n/help\n/help")  # two go through, the third waits 2 s
    await alice.expect(f"* {slow_down_text(0.5)}")
    result = await scrape(gw.health_port)
    assert result.value("chat_flood_delays_total") == 1
    assert set(result.refused().values()) == {0}


async def test_a_kick_is_counted(make_gateway: Any) -> None:
    """An operator's kick (through Redis, as chat-admin sends it) counts one kick."""
    gw = await make_gateway()
    mallory = await user(make_gateway, gw, "mallory")
    assert await gw.broker.kick("mallory", "spam") is not None
    assert await mallory.readline() == "! removed by an operator: spam"
    result = await scrape(gw.health_port)
    assert result.value("chat_kicks_total") == 1
    assert set(result.refused().values()) == {0}


async def test_the_heartbeat_age_is_read_when_scraped(make_gateway: Any) -> None:
    """chat_heartbeat_age_seconds is the time since the last liveness renewal."""
    gw = await make_gateway(heartbeat_interval=3600.0)
    gw.liveness.last_renewal = asyncio.get_running_loop().time() - 42
    age = (await scrape(gw.health_port)).value("chat_heartbeat_age_seconds")
    assert 42 <= age < 42 + T


def test_a_slow_reader_cut_is_counted() -> None:
    """A client past the outgoing bound is disconnected and counted, once; writes within
    the bound count nothing."""
    counts = Counts()
    session = Session(FakeHub(), "sess-1", None, counts)
    transport = FakeTransport()
    session.connection_made(transport)
    session.write(b"fits\n")
    assert counts.slow_readers_cut == 0
    transport.buffer_size = MAX_OUTGOING_BYTES
    session.write(b"one byte too many\n")
    assert transport.calls[-1] == "abort"
    assert counts.slow_readers_cut == 1


async def test_deliveries_count_messages_times_members_per_batch() -> None:
    """A batch of messages counts messages x members (the room splits the batch at a
    newcomer's own join, and each part counts its own members); join notices and events
    already delivered count nothing; the latency is observed once per write to the
    members (here two: before and after the newcomer's join), from its first event's
    stream id."""
    counts = Counts()
    room = Room("#lobby", 0, counts)
    members = [FakeMember(n) for n in ("ana", "bob", "cid")]
    for n, member in enumerate(members):
        enter(room, member, f"1-{n}")
    counts = Counts()  # from here on: what enter() counted is left behind
    room._counts = counts
    newcomer = FakeMember("dan")
    room.expect(newcomer)
    sent_ms = int(time.time() * 1000) - 250
    batch: list[RoomEvent] = [
        ChatMessage(f"{sent_ms}-0", "ana", "one"),
        ChatMessage(f"{sent_ms}-1", "bob", "two"),
        UserJoined(f"{sent_ms}-2", "eve", "gw-2", "eve-s", ""),  # a notice: no delivery
        joined(newcomer, f"{sent_ms}-3"),  # dan is in from here on
        ChatMessage(f"{sent_ms}-4", "cid", "three"),
    ]
    room.deliver_batch(batch)
    assert counts.deliveries == 2 * 3 + 1 * 4
    assert sum(counts.latency_buckets) == 2
    assert 2 * 0.25 <= counts.latency_sum < 2 * (0.25 + T)
    (bucket,) = [i for i, n in enumerate(counts.latency_buckets) if n]
    mean = counts.latency_sum / 2
    assert LATENCY_BUCKETS[bucket] >= mean
    assert bucket == 0 or LATENCY_BUCKETS[bucket - 1] < mean
    room.deliver_batch(batch)  # already delivered: skipped, counted nothing
    assert counts.deliveries == 10
    assert sum(counts.latency_buckets) == 2


def test_latencies_fall_in_the_buckets_prometheus_expects() -> None:
    """A latency equal to a bound counts in that bound's bucket (``le``: at most), one past
    the largest bound only in +Inf; the exposition's buckets are cumulative."""
    counts = Counts()
    for seconds in (0.0, 0.001, 0.0011, 0.5, 1000.0):
        counts.observe_latency(seconds)
    metrics = GatewayMetrics("gw-1", lambda: Snapshot(0, 0, 0, 0.0), counts)
    result = Scrape(metrics.exposition().decode())
    bucket = "chat_delivery_latency_seconds_bucket"
    assert result.value(bucket, le="0.001") == 2
    assert result.value(bucket, le="0.002") == 3
    assert result.value(bucket, le="0.25") == 3
    assert result.value(bucket, le="0.5") == 4
    assert result.value(bucket, le="30.0") == 4
    assert result.value(bucket, le="+Inf") == 5
    assert result.value("chat_delivery_latency_seconds_count") == 5
    assert result.value("chat_delivery_latency_seconds_sum") == pytest.approx(1000.5021)


async def test_a_replayed_gap_counts_the_reconnect_the_events_and_the_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A room subscribed again by itself: one bus reconnect, the events fetched from its
    stream counted as replayed, and each failed attempt to read them as a Redis error."""
    monkeypatch.setattr(relay_module, "RETRY_MIN", 0.001)
    counts = Counts()
    rooms = Rooms(counts=counts)
    math = rooms.open("#math")
    bob = FakeMember("bob")
    enter(math, bob, "1-0")
    math.deliver_batch([msg(2)])
    broker = FakeBroker({"#math": [msg(2), msg(3), msg(4), msg(5)]}, failures=2)
    relay = Relay(broker, "gw-1", rooms, lambda event: None, lambda up: None)  # type: ignore[arg-type]
    assert relay._counts is counts  # the rooms' tallies when none are given
    relay._deliver([("#math", Resubscribed())])
    broker.answer.set()
    async with asyncio.timeout(T):
        await asyncio.wait(set(relay._replays))
    assert counts.bus_reconnects == 1
    assert counts.events_replayed == 3  # 3, 4 and 5
    assert counts.redis_errors == 2


# ---- JSON log lines ---------------------------------------------------------------------


def test_a_json_log_line_is_one_object_with_the_traceback() -> None:
    """The JSON formatter writes one line per record: time in ISO 8601 UTC, level,
    logger, message (arguments applied), gateway id, and the traceback when there is one."""
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "gateway.server", logging.ERROR, __file__, 1, "lost %s\nsecond line", ("ana",), exc_info
    )
    line = JsonFormatter("gw-1").format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "message", "gateway", "exc_info"}
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "gateway.server"
    assert entry["message"] == "lost ana\nsecond line"
    assert entry["gateway"] == "gw-1"
    assert entry["exc_info"].startswith("Traceback")
    assert "ValueError: boom" in entry["exc_info"]
    when = datetime.fromisoformat(entry["time"])
    assert when.utcoffset() == timedelta(0)
    assert abs(when.timestamp() - record.created) < 0.001


def test_a_json_log_line_without_an_exception_has_no_exc_info() -> None:
    record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "listening", (), None)
    entry = json.loads(JsonFormatter("gw-2").format(record))
    assert entry["level"] == "INFO" and entry["message"] == "listening"
    assert "exc_info" not in entry


# ---- the monitoring files ----------------------------------------------------------------


async def test_the_dashboard_queries_only_metrics_the_gateway_exports(
    make_gateway: Any,
) -> None:
    """Every metric name in the Grafana dashboard's queries is one a gateway exports (a
    renamed metric would leave a panel empty without an error), and every chat_ family is
    on the dashboard."""
    gw = await make_gateway()
    exported = (await scrape(gw.health_port)).sample_names()
    exprs = dashboard_exprs()
    assert exprs, f"{DASHBOARD} has no queries"
    used = set().union(*(metric_names(expr) for expr in exprs))
    unknown = sorted(used - exported)
    assert not unknown, f"the dashboard queries metrics no gateway exports: {unknown}"
    shown = {family for family in CHAT_FAMILIES if any(name.startswith(family) for name in used)}
    assert shown == set(CHAT_FAMILIES)


def test_metric_names_are_found_in_promql() -> None:
    """The dashboard test's PromQL reading: metric names, not functions or labels."""
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(chat_login_duration_seconds_bucket[5m])))"
        ' + sum(chat_lines_refused_total{reason="too_long"}) * on(instance) '
        "group_left(gateway) chat_gateway_info"
    )
    assert metric_names(expr) == {
        "chat_login_duration_seconds_bucket",
        "chat_lines_refused_total",
        "chat_gateway_info",
    }


def test_the_dashboard_uses_the_provisioned_prometheus() -> None:
    """Panels name their data source through the dashboard's DS_PROMETHEUS variable,
    which Grafana fills with the Prometheus data source that provisioning adds (by uid)."""
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert variables["DS_PROMETHEUS"]["current"]["value"] == source["uid"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "chat.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_every_gateway_replica_on_its_health_port() -> None:
    """prometheus.yml finds the gateways through Docker's DNS (every replica of the
    `gateway` service, as HAProxy does) on the port compose serves /health and /metrics on."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "chat-gateway"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["gateway"]
    assert sd["type"] == "A"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    health_port = compose["services"]["gateway"]["environment"]["CHAT_HEALTH_PORT"]
    assert str(sd["port"]) == health_port


def test_scrape_parses_what_it_is_given() -> None:
    """The test helper reads samples by name and labels, and says which one is missing."""
    result = Scrape("# TYPE chat_kicks counter\nchat_kicks_total 3.0\n")
    assert result.value("chat_kicks_total") == 3
    with pytest.raises(AssertionError, match="no sample chat_kicks_total"):
        result.value("chat_kicks_total", reason="x")
