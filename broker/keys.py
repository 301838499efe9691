"""Every Redis key and channel name the service uses, and nothing else.

No other module spells a key. Keys come in two families, each in one Redis Cluster slot
through its hash tag, so that every Lua script touches one slot:

* **global** keys, tagged ``{chat}``: presence (name uniqueness is cluster-wide) and
  gateway liveness;
* **room** keys, tagged with the room's folded name (``{#math}``): the room's stream,
  channel, members and display name. Room names hold no braces, so the tag is the whole key.

==================================  ======  ==================================================
key                                 type    meaning
==================================  ======  ==================================================
``{chat}:online``                   hash    folded name -> presence record (JSON: name,
                                            gateway, session, since_ms, room, prev)
``{chat}:activity``                 hash    folded name -> last message time (ms), batched
``{chat}:epoch``                    string  a random token set once per Redis data set: when
                                            it changes, Redis lost its data (restarted empty)
``{chat}:gateways``                 hash    gateway id -> gateway record (JSON: id, address,
                                            instance, started_ms, ttl_ms)
``{chat}:reaping``                  set     gateways found dead whose users' leaves are
                                            being announced (any gateway may finish the job)
``{chat}:pulse``                    string  renewed by every registration and heartbeat;
                                            lapses after half a liveness TTL without one
                                            (nobody reached Redis: it was away, or failing
                                            over)
``{chat}:grace``                    string  set for one liveness TTL by a renewal that finds
                                            the pulse gone while gateways are registered:
                                            nobody is reaped meanwhile
``{chat}:gw:<id>:alive``            string  the gateway instance's token; expires unless
                                            renewed
``{chat}:gw:<id>:users``            set     folded names held by that gateway
``{chat}:gw:<id>:inbox``            pubsub  private messages and kicks for that gateway alone
``{chat}:gw:<id>:anchor``           pubsub  nothing: keeps a rooms-only subscription open
``chat:room:{<room>}:log``          stream  the room's events, capped, oldest trimmed first
``chat:room:{<room>}:said``         stream  its chat messages alone, under their ids in the
                                            log, capped: what history reads
``chat:room:{<room>}:bus``          pubsub  the same events, live: ``<stream id> <body>``,
                                            or ``<id>,<id>,... m <lines>`` for chat
                                            messages published together (a run)
``chat:room:{<room>}:members``      hash    session id -> member (JSON: name, gateway)
``chat:room:{<room>}:name``         string  the room's name as its first member typed it
``chat:room:{<room>}:left:<sess>``  string  set when a leave that Redis could not find (it
                                            lost its data) was announced for that session:
                                            a retry announces nothing more; expires
==================================  ======  ==================================================

A room other than the default one is deleted (all of its keys) when its last member leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "{chat}:"

ONLINE = PREFIX + "online"
ACTIVITY = PREFIX + "activity"
EPOCH = PREFIX + "epoch"
GATEWAYS = PREFIX + "gateways"
REAPING = PREFIX + "reaping"
PULSE = PREFIX + "pulse"
GRACE = PREFIX + "grace"

GATEWAY_PREFIX = PREFIX + "gw:"
ALIVE_SUFFIX = ":alive"
USERS_SUFFIX = ":users"
INBOX_SUFFIX = ":inbox"
ANCHOR_SUFFIX = ":anchor"

#: Every global key, in the order the global scripts receive them as KEYS.
GLOBAL_KEYS = (ONLINE, GATEWAYS, ACTIVITY, REAPING, PULSE, GRACE)
#: The per-gateway key parts the global scripts build names from, as their first ARGV.
GLOBAL_ARGS = (GATEWAY_PREFIX, ALIVE_SUFFIX, USERS_SUFFIX, INBOX_SUFFIX)

#: Entries kept in a room's stream (approximately: trimmed with ``MAXLEN ~``). Enough to
#: replay what a gateway missed during a broker blip of several seconds at high traffic,
#: small enough (a few MB) to cost nothing in Redis memory.
STREAM_MAXLEN = 10_000
#: Chat messages kept per room for history (approximately): ten times what ``/history``
#: shows at most, so paging back has room.
SAID_MAXLEN = 1_000

#: How long a forced leave is remembered: far longer than any retry of it takes.
LEFT_MARK_TTL_MS = 3_600_000


def gateway_alive(gateway_id: str) -> str:
    return f"{GATEWAY_PREFIX}{gateway_id}{ALIVE_SUFFIX}"


def gateway_users(gateway_id: str) -> str:
    return f"{GATEWAY_PREFIX}{gateway_id}{USERS_SUFFIX}"


def gateway_inbox(gateway_id: str) -> str:
    return f"{GATEWAY_PREFIX}{gateway_id}{INBOX_SUFFIX}"


def gateway_anchor(gateway_id: str) -> str:
    """A channel nobody publishes on: it keeps a connection that reads rooms only (on a
    Sentinel replica) subscribed while it carries no room."""
    return f"{GATEWAY_PREFIX}{gateway_id}{ANCHOR_SUFFIX}"


@dataclass(frozen=True, slots=True)
class RoomKeys:
    """The keys of one room, all in the slot of its hash tag."""

    stream: str
    channel: str
    members: str
    name: str
    said: str

    def scripts_keys(self) -> tuple[str, str, str, str, str]:
        """The room's keys in the order the room scripts receive them as KEYS."""
        return (self.stream, self.channel, self.members, self.name, self.said)

    def left_mark(self, session_id: str) -> str:
        return f"{self.members.removesuffix(':members')}:left:{session_id}"


def room(room_key: str) -> RoomKeys:
    """The keys of the room whose folded name is ``room_key`` (``#math``)."""
    base = f"chat:room:{{{room_key}}}"
    return RoomKeys(f"{base}:log", f"{base}:bus", f"{base}:members", f"{base}:name", f"{base}:said")


def room_of_channel(channel: str) -> str | None:
    """The folded room name a room channel belongs to, or None for any other channel."""
    if channel.startswith("chat:room:{") and channel.endswith("}:bus"):
        return channel[len("chat:room:{") : -len("}:bus")]
    return None
