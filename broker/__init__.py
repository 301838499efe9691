"""Everything that talks to Redis: rooms (bus, members, history), presence, private
delivery, gateway liveness.

The rest of the service sees this narrow interface only; key names live in
:mod:`broker.keys`, multi-key updates in the Lua scripts of :mod:`broker.scripts`, the bus
schema in :mod:`broker.events`.
"""

from __future__ import annotations

from broker.connection import Mode, redact_url
from broker.errors import BrokerError, BrokerUnavailable, EventDecodeError, GatewayIdInUse
from broker.events import (
    Announcement,
    ChatMessage,
    ChatRun,
    InboxEvent,
    PrivateDelivery,
    RoomEvent,
    UserJoined,
    UserKicked,
    UserLeft,
    stream_id_key,
)
from broker.redis_broker import (
    Claim,
    Entered,
    GatewayRecord,
    Held,
    Kick,
    Member,
    Presence,
    RedisBroker,
)
from broker.subscription import BusSubscription, Delivery, Resubscribed, Subscription


async def connect(url: str | None, wait: float = 0.0) -> RedisBroker:
    """The broker at ``url`` (one Redis server, any node of a Redis Cluster, or Sentinel's
    ``redis+sentinel://``), or an embedded in-process one when ``url`` is None or empty.
    Waits ``wait`` seconds at most for Redis to answer (:class:`BrokerUnavailable`)."""
    return await RedisBroker.connect(url, wait) if url else RedisBroker.embedded()


__all__ = [
    "Announcement",
    "BrokerError",
    "BrokerUnavailable",
    "BusSubscription",
    "ChatMessage",
    "ChatRun",
    "Claim",
    "Delivery",
    "Entered",
    "EventDecodeError",
    "GatewayIdInUse",
    "GatewayRecord",
    "Held",
    "InboxEvent",
    "Kick",
    "Member",
    "Mode",
    "Presence",
    "PrivateDelivery",
    "RedisBroker",
    "Resubscribed",
    "RoomEvent",
    "Subscription",
    "UserJoined",
    "UserKicked",
    "UserLeft",
    "connect",
    "redact_url",
    "stream_id_key",
]
