"""The broker on Redis: rooms (their bus, members and history), presence, private delivery
and gateway liveness.

One class serves both a real Redis server and the embedded in-process one (fakeredis): the
scripts, keys and code paths are the same, only the client objects differ.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from redis.utils import HIREDIS_AVAILABLE

from broker import connection, durable, keys, scripts
from broker.connection import COMMAND_TIMEOUT, Connection, Mode
from broker.errors import BrokerUnavailable, EventDecodeError, GatewayIdInUse
from broker.events import (
    ChatMessage,
    RoomEvent,
    decode_event,
    decode_member,
    encode_announcement,
    encode_kick,
    encode_leave,
    encode_member,
    encode_private,
)
from broker.held import HeldScript
from broker.sharded import ShardedSubscription
from broker.subscription import BusSubscription, SplitSubscription, Subscription
from broker.translate import text, unavailable_on_error
from chatwire.names import DEFAULT_ROOM, DEFAULT_ROOM_KEY

log = logging.getLogger(__name__)

#: Scripts that add to what users see each time they run. A retry after a lost reply would
#: run them twice (a message shown twice), so they go out once: a failure is reported, and
#: the sender is told its line was not delivered. The other scripts give the same result
#: when repeated (they change a member or a name only once) and may be retried.
ONCE_ONLY = frozenset({"publish", "send_to_holder"})
#: Under Sentinel or on a cluster, every script but these waits for a replica to have its
#: writes (:mod:`broker.durable`). These write nothing a failover must keep: a renewal,
#: activity times, or nothing at all.
UNREPLICATED = frozenset({"heartbeat", "touch", "held_by", "send_to_holder"})


@dataclass(frozen=True, slots=True)
class Presence:
    """One online user, as recorded cluster-wide."""

    name: str
    gateway: str
    session: str
    since: float  # Unix time, seconds
    active: float | None = None  # Unix time of the last message, if any since joining
    room: str = DEFAULT_ROOM  # the room's name as shown
    room_key: str = DEFAULT_ROOM_KEY


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    """One registered gateway."""

    id: str
    address: str
    instance: str
    started: float  # Unix time, seconds
    users: int
    ttl_left: float | None  # seconds before its liveness key expires; None if already gone
    ttl: float  # the full liveness TTL it renews to, seconds


@dataclass(frozen=True, slots=True)
class Held:
    """Who holds a name: the user's display name, session and gateway."""

    name: str
    session: str
    gateway: str


#: What a kick reached (the name as shown, its session and gateway).
Kick = Held


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of a name claim: accepted (with the users online, claimer included)."""

    accepted: bool
    online: int = 0


@dataclass(frozen=True, slots=True)
class Entered:
    """A room after members entered it: its size, its name as shown, and per member entered
    the stream id of its join ("" if it was a member already or entered silently)."""

    members: int
    room: str
    join_ids: list[str]


@dataclass(frozen=True, slots=True)
class Member:
    """A user entering a room: ``join`` is the encoded join event ("" to enter silently)."""

    session: str
    name: str
    gateway: str
    join: str


def _gateway_record(gateway: str, instance: str, address: str, started: float, ttl: float) -> str:
    return json.dumps(
        {
            "id": gateway,
            "address": address,
            "instance": instance,
            "started_ms": int(started * 1000),
            "ttl_ms": int(ttl * 1000),
        }
    )


def _room_args(room: str) -> tuple[int, int, str]:
    """The arguments every room script takes first: the streams' lengths, and whether the
    room stays when empty (the default room does)."""
    return keys.STREAM_MAXLEN, keys.SAID_MAXLEN, "1" if room == DEFAULT_ROOM_KEY else "0"


class RedisBroker:
    """Rooms, presence and liveness on Redis: one server, a primary watched by Sentinel, or
    a Redis Cluster (or the embedded fakeredis), the same scripts and keys on each."""

    def __init__(self, connection: Connection) -> None:
        """``connection.commands`` serves requests and may retry them after a broken link;
        ``connection.bus`` never retries: it runs the scripts in :data:`ONCE_ONLY`, and
        holds subscriptions so that a lost one is noticed and the gap replayed."""
        self.mode = connection.mode
        self.description = connection.description
        self._connection = connection
        self._commands = connection.commands
        self._bus = connection.bus
        sharded = connection.mode is Mode.CLUSTER
        self._scripts = {
            name: (self._bus if name in ONCE_ONLY else self._commands).register_script(source)
            for name, source in scripts.sources(sharded).items()
        }
        #: One server: publishing, the hot path, runs on a connection held for it (read
        #: through hiredis, a dependency; without it, through the client).
        self._publish = (
            HeldScript(self._scripts["publish"], self._bus, COMMAND_TIMEOUT)
            if self.mode is Mode.STANDALONE and HIREDIS_AVAILABLE
            else None
        )

    # -- construction --------------------------------------------------------------------

    @classmethod
    async def connect(cls, url: str, wait: float = 0.0) -> RedisBroker:
        """A broker on the deployment at ``url``: one Redis server, a Redis Cluster (any
        node's URL; detected) or a primary found through Sentinel (``redis+sentinel://``).
        Waits ``wait`` seconds at most for Redis to answer."""
        return cls(await connection.open_url(url, wait))

    @classmethod
    def from_url(cls, url: str) -> RedisBroker:
        """A broker on the one Redis server at ``url``, without asking it anything."""
        return cls(connection.standalone(url))

    @classmethod
    def embedded(cls) -> RedisBroker:
        """A broker on an in-process Redis: one gateway alone, nothing to install."""
        return cls(connection.embedded())

    async def close(self) -> None:
        """Close both connection pools (safe to call twice)."""
        if self._publish is not None:
            with suppress(redis.exceptions.RedisError, OSError):
                await self._publish.aclose()
        for client in (self._bus, self._commands, self._connection.replica):
            if client is None:
                continue
            with suppress(redis.exceptions.RedisError, OSError):  # closing a broken link
                await client.aclose()

    # -- scripts -------------------------------------------------------------------------

    async def _global(self, name: str, args: Sequence[Any]) -> Any:
        return await self._run(name, keys.GLOBAL_KEYS, [*keys.GLOBAL_ARGS, *args])

    async def _room(
        self, name: str, room: str, args: Sequence[Any], extra_keys: Sequence[str] = ()
    ) -> Any:
        return await self._run(
            name, [*keys.room(room).scripts_keys(), *extra_keys], [*_room_args(room), *args]
        )

    async def _run(self, name: str, keys_: Sequence[str], args: Sequence[Any]) -> Any:
        script = self._scripts[name]
        client = self._bus if name in ONCE_ONLY else self._commands
        with unavailable_on_error(name):
            if name in UNREPLICATED or self.mode in (Mode.STANDALONE, Mode.EMBEDDED):
                return await script(keys=keys_, args=args)
            # With replicas to fail over to, a write counts once a replica has it.
            if self.mode is Mode.CLUSTER:
                return await durable.run_on_cluster(client, script, keys_, args)
            return await durable.run_on_primary(client, script, keys_, args)

    async def ping(self) -> None:
        with unavailable_on_error("ping"):
            await self._commands.ping()

    # -- rooms ---------------------------------------------------------------------------

    async def publish(self, room: str, bodies: Sequence[str], said: bool = True) -> list[str]:
        """Append events (encoded) to ``room`` and publish them, in order, in one atomic
        step; chat messages (``said``) are kept for history too. Returns their stream ids
        (none if the room has gone: nobody is there)."""
        flag = "1" if said else "0"
        if self._publish is None:
            return [text(i) for i in await self._room("publish", room, [flag, *bodies])]
        with unavailable_on_error("publish"):
            ids = await self._publish(
                keys.room(room).scripts_keys(), (*_room_args(room), flag), bodies
            )
        return [text(i) for i in ids]

    async def enter(self, room: str, shown: str, members: Sequence[Member]) -> Entered:
        """Make ``members`` members of ``room`` (created, named ``shown``, if new), each
        join announced once (and never if it was a member already)."""
        args: list[str] = [shown]
        for m in members:
            args += [m.session, encode_member(m.name, m.gateway), m.join]
        count, name, *ids = await self._room("enter", room, args)
        return Entered(int(count), text(name), [text(i) for i in ids])

    async def leave(self, room: str, leaves: Sequence[tuple[str, str]]) -> list[str]:
        """Remove sessions from ``room``, each with its encoded leave event, announced only
        if it was still a member. Returns the leaves' stream ids ("" where none)."""
        args = [v for pair in leaves for v in pair]
        return [text(i) for i in await self._room("leave", room, args)]

    async def force_leave(self, room: str, session: str, event: str) -> bool:
        """Announce the leave of a member whose membership Redis lost with its data, once
        per session however often it is retried. True if announced."""
        mark = keys.room(room).left_mark(session)
        return bool(
            await self._room("force_leave", room, (session, event, keys.LEFT_MARK_TTL_MS), [mark])
        )

    @asynccontextmanager
    async def subscription(
        self, gateway: str, rooms: Sequence[str]
    ) -> AsyncIterator[BusSubscription]:
        """A live subscription to ``gateway``'s inbox and to ``rooms``, confirmed on entry;
        :class:`BrokerUnavailable` on entry or while iterating when the link breaks.
        Events published meanwhile are recovered with :meth:`events_after`. On a cluster,
        a room whose node is lost is subscribed again by itself, marked
        :class:`Resubscribed` in the deliveries."""
        subscription: BusSubscription
        if self.mode is Mode.CLUSTER:
            subscription = ShardedSubscription(self._bus, gateway)
        elif self.mode is Mode.SENTINEL:
            subscription = SplitSubscription(
                self._connection.replica.pubsub(), self._bus.pubsub(), gateway
            )
        else:
            subscription = Subscription(self._bus.pubsub(), gateway)
        try:
            await subscription.open(rooms)
            yield subscription
        finally:
            await subscription.close()

    async def history(self, room: str, count: int, before: str | None = None) -> list[ChatMessage]:
        """The last ``count`` chat messages of ``room`` (before stream id ``before``), oldest
        first: one read of the room's stream of what was said, however many joins and
        leaves came since."""
        upper = f"({before}" if before else "+"
        with unavailable_on_error("history"):
            page = await self._commands.xrevrange(
                keys.room(room).said, max=upper, min="-", count=count
            )
        return [e for e in _decode_entries(page[::-1]) if isinstance(e, ChatMessage)]

    async def events_after(self, room: str, event_id: str) -> list[RoomEvent]:
        """Every event of ``room`` still in its stream after ``event_id``, oldest first.
        Under Sentinel, read on the replica the room's live events come from, so that a
        replay gives nothing a failover could lose. (On a cluster, on the room's primary:
        a line it has there but its replica had not yet is not lost to the failover that
        would follow, since every write waits for the replica.)"""
        client = self._connection.replica or self._commands
        with unavailable_on_error("replay"):
            entries = await client.xrange(keys.room(room).stream, min=f"({event_id}")
        return _decode_entries(entries, log.warning)

    async def members(self, room: str) -> list[str]:
        """The names of ``room``'s members, cluster-wide."""
        with unavailable_on_error("members"):
            records = await self._commands.hvals(keys.room(room).members)
        return [decode_member(r)[0] for r in records]

    async def rooms(self) -> list[tuple[str, int]]:
        """Every room that has members: (name as shown, members)."""
        users = await self.online()
        counts: dict[str, tuple[str, int]] = {}
        for user in users:
            shown, n = counts.get(user.room_key, (user.room, 0))
            counts[user.room_key] = (shown, n + 1)
        return sorted(counts.values(), key=lambda r: (r[0].casefold(), r[0]))

    async def room_name(self, room: str) -> str | None:
        """``room``'s name as its first member typed it, if it exists."""
        with unavailable_on_error("room name"):
            value = await self._commands.get(keys.room(room).name)
        return None if value is None else text(value)

    async def announce(self, text_: str, room: str | None = None) -> int:
        """Send a system line to every member of ``room`` (None: of every room that has
        members, and the default room). Returns how many rooms it reached."""
        rooms = (
            [room]
            if room
            else sorted({DEFAULT_ROOM_KEY} | {u.room_key for u in await self.online()})
        )
        reached = 0
        for key in rooms:
            reached += bool(await self.publish(key, [encode_announcement(text_)], said=False))
        return reached

    # -- presence ------------------------------------------------------------------------

    async def claim(
        self, key: str, name: str, gateway: str, instance: str, session: str, since: float,
        room: str = DEFAULT_ROOM_KEY,
    ) -> Claim:  # fmt: skip
        """Claim name ``key`` for ``session``, in ``room``. Its join is the room's
        business (:meth:`enter`)."""
        result = await self._global(
            "claim", (key, name, gateway, session, int(since * 1000), instance, room)
        )
        status = int(result[0])
        if status < 0:
            raise BrokerUnavailable(f"gateway {gateway} is not registered as live")
        return Claim(True, int(result[1])) if status else Claim(False)

    async def set_room(self, key: str, session: str, room: str) -> bool:
        """Record that ``session`` is moving to ``room``; False if it no longer holds ``key``."""
        return bool(await self._global("set_room", (key, session, room)))

    async def release(self, key: str, session: str, gateway: str = "") -> bool | None:
        """Free ``key`` if ``session`` still holds it; True if it did.

        None: nobody holds it and ``gateway`` is not registered, so Redis may have lost its
        data; the gateway decides once registered again (see :meth:`force_leave`).
        """
        status = int(await self._global("release", (key, session, gateway)))
        return None if status < 0 else bool(status)

    async def epoch(self) -> str:
        """A token that stays the same for as long as Redis keeps its data: compare two
        readings to learn whether it restarted empty in between."""
        with unavailable_on_error("epoch"):
            token = secrets.token_hex(8)
            # One atomic command (Redis 7): the token already there, or None if ours was set.
            value = await self._commands.set(keys.EPOCH, token, nx=True, get=True)
        return text(value or token)

    async def online(self) -> list[Presence]:
        """Everyone online, cluster-wide, with the room each is in."""
        with unavailable_on_error("online"):
            async with self._commands.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.ONLINE)
                pipe.hgetall(keys.ACTIVITY)
                records, activity = await pipe.execute()
            parsed = [(key, json.loads(raw)) for key, raw in records.items()]
            room_keys = sorted({f.get("room") or DEFAULT_ROOM_KEY for _, f in parsed})
            # One GET per room, not MGET: on a cluster, rooms live in different slots.
            async with self._commands.pipeline(transaction=False) as pipe:
                for r in room_keys:
                    pipe.get(keys.room(r).name)
                names = await pipe.execute() if room_keys else []
        shown = {r: text(n) if n is not None else r for r, n in zip(room_keys, names, strict=True)}
        shown[DEFAULT_ROOM_KEY] = shown.get(DEFAULT_ROOM_KEY) or DEFAULT_ROOM
        users = []
        for key, fields in parsed:
            active = activity.get(key)
            room = fields.get("room") or DEFAULT_ROOM_KEY
            users.append(
                Presence(
                    fields["name"],
                    fields["gateway"],
                    fields["session"],
                    fields["since_ms"] / 1000,
                    int(active) / 1000 if active is not None else None,
                    shown.get(room, room),
                    room,
                )
            )
        return users

    async def online_count(self) -> int:
        """How many users are online, cluster-wide."""
        with unavailable_on_error("online count"):
            return int(await self._commands.hlen(keys.ONLINE))

    async def touch(self, last_active: dict[str, float]) -> None:
        """Record users' last message times ({name key: Unix time}); one call per batch."""
        if last_active:
            args = [v for key, ts in last_active.items() for v in (key, int(ts * 1000))]
            await self._global("touch", args)

    async def _send_to_holder(self, key: str, event: str) -> tuple[Held, int] | None:
        result = await self._global("send_to_holder", (key, event))
        if not int(result[0]):
            return None
        name, session, gateway = (text(v) for v in result[1:4])
        return Held(name, session, gateway), int(result[4])

    async def send_private(self, key: str, sender: str, message: str) -> str | None:
        """Deliver ``message`` from ``sender`` to the user whose folded name is ``key``,
        through that user's gateway alone. Returns the recipient's name as shown; None if
        nobody by that name is online. :class:`BrokerUnavailable` if it did not go out."""
        sent = await self._send_to_holder(key, encode_private(key, sender, message))
        if sent is None:
            return None
        held, receivers = sent
        if not receivers:
            raise BrokerUnavailable(f"gateway {held.gateway} is not listening")
        return held.name

    async def kick(self, key: str, reason: str) -> Kick | None:
        """Ask the gateway holding name ``key`` to disconnect it. None: nobody has it."""
        sent = await self._send_to_holder(key, encode_kick(key, reason))
        return None if sent is None else sent[0]

    async def holder(self, key: str) -> Held | None:
        """Who holds name ``key`` now, if anyone."""
        with unavailable_on_error("holder"):
            raw = await self._commands.hget(keys.ONLINE, key)
        if raw is None:
            return None
        fields = json.loads(raw)
        return Held(fields["name"], fields["session"], fields["gateway"])

    # -- gateway liveness ----------------------------------------------------------------

    async def register_gateway(
        self, gateway: str, instance: str, address: str, started: float, ttl: float
    ) -> int:
        """Mark ``gateway`` live. Users left behind by an earlier run under the same id are
        evicted (their leaves announced); returns how many. Raises :class:`GatewayIdInUse`
        if another live instance holds the id."""
        record = _gateway_record(gateway, instance, address, started, ttl)
        ok, leftovers = await self._global("register", (gateway, instance, record, int(ttl * 1000)))
        if not int(ok):
            raise GatewayIdInUse(f"gateway id {gateway!r} is already used by a live gateway")
        if not int(leftovers):
            return 0
        return await self.evict(gateway, spare_live=True)

    async def restore_gateway(
        self,
        gateway: str,
        instance: str,
        address: str,
        started: float,
        ttl: float,
        users: Sequence[tuple[str, str, str, float, str]],
    ) -> list[str]:
        """Register again after the registration was lost, restoring ``users`` (name key,
        display name, session, since, room key) in the same atomic step. Returns the keys
        another session holds by now; :class:`GatewayIdInUse` if another instance took the
        id. Room memberships are the caller's to restore (:meth:`enter`)."""
        args: list[Any] = [
            gateway,
            instance,
            _gateway_record(gateway, instance, address, started, ttl),
            int(ttl * 1000),
        ]
        for key, name, session, since, room in users:
            args += [key, name, session, int(since * 1000), room]
        for _ in range(2):
            status, *refused = await self._global("restore", args)
            if int(status) == -2:  # our eviction is under way: finish it, then restore
                await self.evict(gateway, spare_live=True)
                continue
            if int(status) == -1:
                raise GatewayIdInUse(f"gateway id {gateway!r} was taken by another instance")
            return [text(k) for k in refused]
        raise BrokerUnavailable(f"gateway {gateway} is still being evicted")

    async def heartbeat(self, gateway: str, instance: str, ttl: float) -> bool:
        """Renew liveness. False means the registration was lost (reaped, or Redis lost its
        data) and must be made again; :class:`GatewayIdInUse` if another instance took it."""
        status = int(await self._global("heartbeat", (gateway, instance, int(ttl * 1000))))
        if status < 0:
            raise GatewayIdInUse(f"gateway id {gateway!r} was taken by another instance")
        return status == 1

    async def reap_dead_gateways(self) -> dict[str, int]:
        """Forget every gateway whose liveness expired, announcing its users' leaves once.
        Returns {gateway id: leaves this call announced}, for the gateways whose reaping
        this call finished (of gateways reaping the same one at once, one reports it)."""
        reaped = {}
        for gateway in [text(g) for g in await self._global("reap", ())]:
            announced, finished = await self._evict(gateway, spare_live=True)
            if finished:
                reaped[gateway] = announced
        return reaped

    async def evict(self, gateway: str, spare_live: bool = False) -> int:
        """Announce the leave of every user ``gateway`` holds in the rooms they are in,
        then free their names; with ``spare_live``, only those of a dead instance (not of
        one that holds the id now). Safe to repeat, and to run from several gateways at
        once: each leave is announced once. Returns how many leaves this call announced."""
        return (await self._evict(gateway, spare_live))[0]

    async def _evict(self, gateway: str, spare_live: bool) -> tuple[int, bool]:
        flat = await self._global("held_by", (gateway, "1" if spare_live else "0"))
        users = []
        leaves: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key, raw in zip(flat[::2], flat[1::2], strict=True):
            fields = json.loads(raw)
            session = str(fields["session"])
            users.append((text(key), session))
            event = encode_leave(str(fields["name"]), gateway, session)
            # The room it was in before its last move too: a move cut short by a crash
            # may have left it there.
            for room in {fields.get("room") or DEFAULT_ROOM_KEY, fields.get("prev") or ""} - {""}:
                leaves[room].append((session, event))
        announced: set[str] = set()
        for room, pairs in leaves.items():
            ids = await self.leave(room, pairs)
            announced.update(session for (session, _), i in zip(pairs, ids, strict=True) if i)
        _, finished = await self._global("forget", (gateway, *(v for pair in users for v in pair)))
        return len(announced), bool(int(finished))

    async def deregister_gateway(self, gateway: str, instance: str) -> int:
        """A clean stop: announce the leave of every user still held, forget the gateway.
        Returns how many users were evicted."""
        evicted = await self.evict(gateway)
        await self._global("deregister", (gateway, instance))
        return evicted

    async def gateways(self) -> list[GatewayRecord]:
        """Every registered gateway, with its user count and time left on its liveness."""
        with unavailable_on_error("gateways"):
            records = await self._commands.hvals(keys.GATEWAYS)
            parsed = [json.loads(raw) for raw in records]
            async with self._commands.pipeline(transaction=False) as pipe:
                for fields in parsed:
                    pipe.pttl(keys.gateway_alive(fields["id"]))
                    pipe.scard(keys.gateway_users(fields["id"]))
                replies = await pipe.execute()
        result = []
        for index, fields in enumerate(parsed):
            pttl, users = replies[2 * index], replies[2 * index + 1]
            result.append(
                GatewayRecord(
                    fields["id"],
                    fields["address"],
                    fields["instance"],
                    fields["started_ms"] / 1000,
                    int(users),
                    pttl / 1000 if pttl >= 0 else None,
                    fields["ttl_ms"] / 1000,
                )
            )
        return result


def _decode_entries(entries: Any, warn: Callable[..., None] | None = None) -> list[RoomEvent]:
    events: list[RoomEvent] = []
    for raw_id, fields in entries or ():
        entry_id = text(raw_id)
        try:
            events.append(decode_event(entry_id, (fields or {})[b"d"]))
        except (EventDecodeError, KeyError) as exc:
            if warn is not None:
                warn("skipping a stream entry %s: %s", entry_id, exc)
    return events
