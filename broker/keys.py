"""Every Redis key and channel name the service uses, and nothing else.

No other module spells a key. Lua scripts get the names they need as KEYS or, for keys
built per gateway inside a script, as the prefix and suffixes below in ARGV.

===========================  ======  ===========================================================
key                          type    meaning
===========================  ======  ===========================================================
``chat:online``              hash    folded name -> presence record (JSON: name, gateway,
                                     session, since_ms)
``chat:activity``            hash    folded name -> last message time (ms), written in batches
``chat:epoch``               string  a random token set once per Redis data set: when it
                                     changes, Redis lost its data (restarted empty)
``chat:gateways``            hash    gateway id -> gateway record (JSON: id, address,
                                     instance, started_ms)
``chat:gw:{id}:alive``       string  the gateway instance's token; expires unless renewed
``chat:gw:{id}:users``       set     folded names held by that gateway (for the reaper)
``chat:left:{session}``      string  set when a leave Redis could not find (it lost its data)
                                     was announced for that session: a retry announces
                                     nothing more; expires after ``LEFT_MARK_TTL_MS``
``chat:room:lobby:log``      stream  the room's events, capped, oldest trimmed first
``chat:room:lobby``          pubsub  the same events, live: ``<stream id> <JSON>``
===========================  ======  ===========================================================
"""

from __future__ import annotations

PREFIX = "chat:"

ONLINE = PREFIX + "online"
ACTIVITY = PREFIX + "activity"
EPOCH = PREFIX + "epoch"
GATEWAYS = PREFIX + "gateways"

GATEWAY_PREFIX = PREFIX + "gw:"
ALIVE_SUFFIX = ":alive"
USERS_SUFFIX = ":users"

ROOM = "lobby"
ROOM_CHANNEL = f"{PREFIX}room:{ROOM}"
ROOM_STREAM = f"{PREFIX}room:{ROOM}:log"

#: Entries kept in the room stream (approximately: trimmed with ``MAXLEN ~``). Enough to
#: replay what a gateway missed during a broker blip of several seconds at high traffic,
#: small enough (a few MB) to cost nothing in Redis memory.
STREAM_MAXLEN = 10_000


#: How long a forced leave is remembered: far longer than any retry of it takes.
LEFT_MARK_TTL_MS = 3_600_000


def session_left(session_id: str) -> str:
    return f"{PREFIX}left:{session_id}"


def gateway_alive(gateway_id: str) -> str:
    return f"{GATEWAY_PREFIX}{gateway_id}{ALIVE_SUFFIX}"


def gateway_users(gateway_id: str) -> str:
    return f"{GATEWAY_PREFIX}{gateway_id}{USERS_SUFFIX}"
