"""Everything that talks to Redis: rooms (bus, members, history), presence, private
delivery, gateway liveness.

The rest of the service sees this narrow interface only; key names live in
:mod:`broker.keys`, multi-key updates in the Lua scripts of :mod:`broker.scripts`, the bus
schema in :mod:`broker.events`.
"""

from __future__ import annotations

from broker.errors import BrokerError, BrokerUnavailable, EventDecodeError, GatewayIdInUse
from broker.events import (
    Announcement,
    ChatMessage,
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
    redact_url,
)
from broker.subscription import Delivery, Subscription


def connect(url: str | None) -> RedisBroker:
    """The broker at ``url``, or an embedded in-process one when ``url`` is None or empty.

    Nothing is contacted yet: the first operation connects.
    """
    return RedisBroker.from_url(url) if url else RedisBroker.embedded()


__all__ = [
    "Announcement",
    "BrokerError",
    "BrokerUnavailable",
    "ChatMessage",
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
    "Presence",
    "PrivateDelivery",
    "RedisBroker",
    "RoomEvent",
    "Subscription",
    "UserJoined",
    "UserKicked",
    "UserLeft",
    "connect",
    "redact_url",
    "stream_id_key",
]
