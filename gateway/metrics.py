"""The gateway's metrics, in the Prometheus text format (``GET /metrics`` on the health port).

Two kinds of figures, kept two ways:

* **Tallies** (:class:`Counts`): plain ``int`` attributes that the code counting them
  increments where it happens, some of them on the delivery hot path (a Prometheus counter
  takes a lock per increment; an attribute increment is the cheapest thing Python does).
  Fan-out counts once per batch, never per recipient. The collector reads them at scrape
  time and exports them as counters.
* **Distributions**: the publish-to-delivery latency, observed once per batch written to
  a room's members, is a histogram of plain ints too (its bucket found by bisection: a
  sixth of what a prometheus_client ``Histogram.observe`` costs, with its lock per bucket); the
  login duration, once per login, is a prometheus_client ``Histogram``.

Gauges (clients, users, rooms, heartbeat age) are read from the gateway's own state at
scrape time, through :class:`Snapshot`. Every metric lives in a registry of the gateway's
own, so several gateways in one process (the tests) never mix their figures.

Names all start with ``chat_``; README.md ("Metrics and logs") lists them.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector

__all__ = ["CONTENT_TYPE", "Counts", "GatewayMetrics", "Refusal", "Snapshot"]

#: The classic text format, which every Prometheus reads. (prometheus_client's own
#: CONTENT_TYPE_LATEST says ``version=1.0.0`` from 0.22 on; our names need nothing newer.)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# No ``*_created`` series beside each histogram: the text format has no place for them, so
# they would come out as gauges of their own, and Prometheus does not need them. (A setting
# of the library, for the whole process: the gateway is the process's one exporter.)
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Seconds from a name sent to the user admitted to its room: a claim and a join are a few
#: Redis round trips (milliseconds); a join event never seen is admitted after 5 s anyway.
LOGIN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Seconds from an event's stream id (Redis's clock, millisecond resolution) to its batch
#: written to the local members: about 2 ms on a quiet loopback, tens of ms under load, and
#: seconds for a gap replayed after an outage.
LATENCY_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Refusal(enum.StrEnum):
    """Why a ``! `` line turned something a client sent away: the ``reason`` label of
    ``chat_lines_refused_total``. A fixed set, so that the label cannot grow."""

    #: Over the line length limit (PROTOCOL.md item 2).
    TOO_LONG = "too_long"
    #: Malformed: a bad name or room name, an unknown command, bad arguments, a WebSocket
    #: frame with a line break inside.
    INVALID = "invalid"
    #: The name asked for is held by someone else.
    NAME_TAKEN = "name_taken"
    #: ``/msg`` to a name nobody holds.
    NOT_ONLINE = "not_online"
    #: Redis could not take it: a message not delivered, a login, move or list refused.
    UNAVAILABLE = "unavailable"
    #: A connection turned away at the door: the gateway or the client's address is full.
    FULL = "full"
    #: An unexpected error in the gateway (the connection is closed).
    INTERNAL = "internal"


class Counts:
    """The gateway's tallies, as plain ints; read at scrape time by :class:`GatewayMetrics`."""

    __slots__ = (
        "batches_delayed",
        "bus_reconnects",
        "deliveries",
        "events_replayed",
        "flood_delays",
        "kicks",
        "latency_buckets",
        "latency_sum",
        "messages_received",
        "redis_errors",
        "refused",
        "slow_readers_cut",
    )

    def __init__(self) -> None:
        #: Chat lines taken from users (each is published to its room once).
        self.messages_received = 0
        #: Chat messages written to local members: one message reaching one recipient.
        self.deliveries = 0
        #: ``! `` lines sent, by why (a :class:`Refusal`).
        self.refused: dict[str, int] = dict.fromkeys(Refusal, 0)
        #: Times a client went over its rate and its input was held back (each pause).
        self.flood_delays = 0
        #: Clients disconnected for not reading (over MAX_OUTGOING_BYTES queued).
        self.slow_readers_cut = 0
        #: Users removed by an operator (``chat-admin kick``).
        self.kicks = 0
        #: Redis failures the gateway met (each BrokerUnavailable it caught).
        self.redis_errors = 0
        #: Bus subscriptions made again after a break (the whole subscription; on a Redis
        #: Cluster also one room's, subscribed again by itself).
        self.bus_reconnects = 0
        #: Room events fetched from the streams to fill a gap in the subscription.
        self.events_replayed = 0
        #: Times busy output waited for the batch window to go out with what followed (a
        #: room's lines to its members, or messages to Redis): gateway.batching.
        self.batches_delayed = 0
        #: Publish-to-delivery latencies: how many fell in each of LATENCY_BUCKETS (not
        #: cumulative; the last, past the largest bound), and their sum in seconds.
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def refuse(self, reason: Refusal) -> None:
        self.refused[reason] += 1

    def observe_latency(self, seconds: float) -> None:
        """One publish-to-delivery latency (the bucket of the first bound >= ``seconds``)."""
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds


class Snapshot(NamedTuple):
    """The gateway's state that gauges show, read at scrape time."""

    connected_clients: int
    logged_in_users: int
    rooms_hosted: int
    #: Seconds since the gateway last renewed its liveness in Redis.
    heartbeat_age: float


class GatewayMetrics:
    """One gateway's metrics registry: its tallies, histograms and gauges."""

    def __init__(
        self, gateway_id: str, snapshot: Callable[[], Snapshot], counts: Counts | None = None
    ) -> None:
        self.counts = counts if counts is not None else Counts()
        self.registry = CollectorRegistry(auto_describe=False)
        self.login_duration = Histogram(
            "chat_login_duration_seconds",
            "Seconds from a name sent to the user admitted to its room (successful logins).",
            buckets=LOGIN_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Collector(gateway_id, snapshot, self.counts))
        ProcessCollector(registry=self.registry)

    def exposition(self) -> bytes:
        """Every metric, in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _Collector:
    """The tallies and gauges, made into metric families when Prometheus scrapes."""

    def __init__(self, gateway_id: str, snapshot: Callable[[], Snapshot], counts: Counts) -> None:
        self._gateway_id = gateway_id
        self._snapshot = snapshot
        self._counts = counts

    def describe(self) -> Iterator[Metric]:
        """The families' names (the registry checks them for clashes), without reading
        any state: registration happens before the gateway has any."""
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self._snapshot())

    def _families(self, snap: Snapshot | None) -> Iterator[Metric]:
        counts = self._counts
        info = InfoMetricFamily("chat_gateway", "This gateway's id in the cluster.")
        if snap is not None:
            info.add_metric([], {"gateway": self._gateway_id})
        yield info
        gauges = (
            ("chat_connected_clients", "Client connections open (TCP, TLS and WebSocket)."),
            ("chat_logged_in_users", "Users logged in on this gateway."),
            ("chat_rooms_hosted", "Rooms with local members (or some on the way in)."),
            ("chat_heartbeat_age_seconds", "Seconds since the last liveness renewal in Redis."),
        )
        for index, (name, documentation) in enumerate(gauges):
            yield GaugeMetricFamily(
                name, documentation, value=None if snap is None else float(snap[index])
            )
        counters = (
            ("chat_messages_received", "Chat messages received from users.",
             counts.messages_received),
            ("chat_deliveries", "Chat messages written to local recipients (one message "
             "reaching one recipient).", counts.deliveries),
            ("chat_flood_delays", "Times a client's input was held back for going over its "
             "rate.", counts.flood_delays),
            ("chat_slow_readers_cut", "Clients disconnected for not reading their output.",
             counts.slow_readers_cut),
            ("chat_kicks", "Users removed by an operator.", counts.kicks),
            ("chat_redis_errors", "Redis failures met by the gateway.", counts.redis_errors),
            ("chat_bus_reconnects", "Bus subscriptions made again after a break.",
             counts.bus_reconnects),
            ("chat_events_replayed", "Room events replayed from the streams after a gap in "
             "the subscription.", counts.events_replayed),
            ("chat_batches_delayed", "Times a busy room's lines, or a busy gateway's messages "
             "to Redis, waited for the batch window to go out with what followed.",
             counts.batches_delayed),
        )  # fmt: skip
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=None if snap is None else value)
        latency = HistogramMetricFamily(
            "chat_delivery_latency_seconds",
            "Seconds from an event's stream id (when Redis took it) to its delivery to the "
            "local members; one observation per batch written to a room's members (its "
            "oldest event).",
        )
        if snap is not None:
            cumulative, total = [], 0
            bounds = (*LATENCY_BUCKETS, float("inf"))
            for bound, count in zip(bounds, counts.latency_buckets, strict=True):
                total += count
                cumulative.append((_bound(bound), float(total)))
            latency.add_metric([], cumulative, counts.latency_sum)
        yield latency
        refused = CounterMetricFamily(
            "chat_lines_refused",
            "Lines (and connections) refused with a `! ` line, by reason.",
            labels=["reason"],
        )
        if snap is not None:
            for reason, value in counts.refused.items():
                refused.add_metric([str(reason)], value)
        yield refused


def _bound(value: float) -> str:
    """A bucket's ``le`` label as prometheus_client writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if value == float("inf") else repr(float(value))
