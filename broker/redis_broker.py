"""The broker on Redis: the room bus, presence and gateway liveness.

One class serves both a real Redis server and the embedded in-process one (fakeredis): the
scripts, keys and code paths are the same, only the client objects differ.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from broker import keys, scripts
from broker.errors import BrokerUnavailable, EventDecodeError, GatewayIdInUse
from broker.events import (
    ChatMessage,
    RoomEvent,
    decode_bus_message,
    decode_event,
    encode_announcement,
)

log = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection to Redis before calling it unavailable.
CONNECT_TIMEOUT = 3.0
#: Seconds to wait for any single Redis reply; a stuck Redis must not stall a gateway.
COMMAND_TIMEOUT = 5.0
#: Connections one process opens to Redis for commands, at most.
MAX_CONNECTIONS = 32
#: Seconds between PINGs on an idle subscription, so a dead link is noticed.
HEALTH_CHECK_INTERVAL = 5
#: Seconds a subscription read waits before looping (and health-checking) again.
POLL_INTERVAL = 1.0
#: Events taken from the subscription in one go, at most: large enough to amortise a
#: write per client over many messages, small enough to keep each pass short.
MAX_BATCH = 512
#: Scripts that append to the room each time they run. A retry after a lost reply would
#: run them twice (a message shown twice), so they go out once: a failure is reported,
#: and the sender is told its line was not delivered. The other scripts give the same
#: result when repeated and may be retried.
ONCE_ONLY = frozenset({"publish", "kick"})
#: Stream pages read backwards, at most, to find the last messages among joins and leaves.
HISTORY_PAGES = 8


@dataclass(frozen=True, slots=True)
class Presence:
    """One online user, as recorded cluster-wide."""

    name: str
    gateway: str
    session: str
    since: float  # Unix time, seconds
    active: float | None = None  # Unix time of the last message, if any since joining


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
class Kick:
    """Who a kick reached: the user's display name, session and gateway."""

    name: str
    session: str
    gateway: str


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of a name claim: accepted (with the room size, joiner included) or taken."""

    accepted: bool
    online: int = 0
    event_id: str = ""


def redact_url(url: str) -> str:
    """``url`` with any password replaced, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


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


@contextmanager
def _unavailable_on_error(what: str) -> Iterator[None]:
    """Translate every Redis failure into :class:`BrokerUnavailable` at the package edge."""
    try:
        yield
    except (redis.exceptions.RedisError, OSError) as exc:
        raise BrokerUnavailable(f"{what}: {exc or type(exc).__name__}") from exc


class RedisBroker:
    """Room bus, presence and liveness on one Redis (real, or embedded with fakeredis)."""

    def __init__(self, commands: aioredis.Redis, bus: aioredis.Redis, description: str) -> None:
        """``commands`` serves requests and may retry them after a broken link; ``bus``
        never retries: it holds subscriptions, so that a lost one is noticed and the gap
        replayed, and it runs the scripts in :data:`ONCE_ONLY`."""
        self._commands = commands
        self._bus = bus
        self.description = description
        self._scripts = {
            name: (bus if name in ONCE_ONLY else commands).register_script(scripts.PRELUDE + body)
            for name, body in (
                ("publish", scripts.PUBLISH),
                ("claim", scripts.CLAIM),
                ("release", scripts.RELEASE),
                ("force_leave", scripts.FORCE_LEAVE),
                ("register", scripts.REGISTER),
                ("heartbeat", scripts.HEARTBEAT),
                ("reap", scripts.REAP),
                ("deregister", scripts.DEREGISTER),
                ("kick", scripts.KICK),
                ("restore", scripts.RESTORE),
                ("touch", scripts.TOUCH),
            )
        }

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str) -> RedisBroker:
        """A broker on the Redis server at ``url`` (``redis://``, ``rediss://``, ``unix://``)."""
        common: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": COMMAND_TIMEOUT,
            "socket_keepalive": True,
            "health_check_interval": HEALTH_CHECK_INTERVAL,
        }
        try:
            # A bounded pool that waits for a free connection: a login storm queues its
            # claims here instead of opening a connection each (or failing past a cap).
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=MAX_CONNECTIONS,
                timeout=COMMAND_TIMEOUT,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                **common,
            )
            commands = aioredis.Redis.from_pool(pool)
            bus = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **common)
            # redis-py takes unknown URL options and fails on them only when it first
            # connects; making a connection object (no I/O) finds them now.
            commands.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        except (ValueError, TypeError) as exc:
            raise BrokerUnavailable(f"invalid Redis URL {redact_url(url)!r}: {exc}") from exc
        return cls(commands, bus, f"Redis at {redact_url(url)}")

    @classmethod
    def embedded(cls) -> RedisBroker:
        """A broker on an in-process Redis: one gateway alone, nothing to install."""
        import fakeredis

        server = fakeredis.FakeServer()
        return cls(
            fakeredis.FakeAsyncRedis(server=server),
            fakeredis.FakeAsyncRedis(server=server),
            "embedded in-process broker",
        )

    async def close(self) -> None:
        """Close both connection pools (safe to call twice)."""
        for client in (self._bus, self._commands):
            with suppress(redis.exceptions.RedisError, OSError):  # closing a broken link
                await client.aclose()

    # -- scripts -------------------------------------------------------------------------

    async def _run(self, name: str, extra_keys: Sequence[str], args: Sequence[Any]) -> Any:
        script = self._scripts[name]
        with _unavailable_on_error(name):
            return await script(
                keys=[
                    keys.ROOM_STREAM,
                    keys.ROOM_CHANNEL,
                    keys.ONLINE,
                    keys.GATEWAYS,
                    keys.ACTIVITY,
                    *extra_keys,
                ],
                args=[
                    keys.STREAM_MAXLEN,
                    keys.GATEWAY_PREFIX,
                    keys.ALIVE_SUFFIX,
                    keys.USERS_SUFFIX,
                    *args,
                ],
            )

    async def ping(self) -> None:
        with _unavailable_on_error("ping"):
            await self._commands.ping()

    # -- room bus ------------------------------------------------------------------------

    async def publish(self, bodies: Sequence[str]) -> list[str]:
        """Append chat messages (JSON bodies) to the room and publish them, in order, in
        one atomic step. Returns their stream ids."""
        ids = await self._run("publish", (), bodies)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[RoomEvent]]:
        """Subscribe to the room; yields the live events in stream order, one by one.

        Raises :class:`BrokerUnavailable` (on entry or while iterating) when the link
        breaks; events published meanwhile are recovered with :meth:`events_after`.
        """
        async with self.subscribe_batches() as batches:

            async def events() -> AsyncIterator[RoomEvent]:
                async for batch in batches:
                    for event in batch:
                        yield event

            yield events()

    @asynccontextmanager
    async def subscribe_batches(self) -> AsyncIterator[AsyncIterator[list[RoomEvent]]]:
        """Like :meth:`subscribe`, but yields every event already received at once as one
        list: under load one read carries many, and a gateway writes them to each client
        in one go."""
        pubsub = self._bus.pubsub(ignore_subscribe_messages=True)
        try:
            with _unavailable_on_error("subscribe"):
                await pubsub.subscribe(keys.ROOM_CHANNEL)
            yield self._listen(pubsub)
        finally:
            with suppress(redis.exceptions.RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _listen(self, pubsub: PubSub) -> AsyncIterator[list[RoomEvent]]:
        while True:
            with _unavailable_on_error("subscription"):
                message = await pubsub.get_message(timeout=POLL_INTERVAL)
                if message is None:
                    continue
                messages = [message]
                # Whatever has arrived already comes without waiting (timeout 0).
                while len(messages) < MAX_BATCH:
                    more = await pubsub.get_message(timeout=0)
                    if more is None:
                        break
                    messages.append(more)
            batch = []
            for m in messages:
                if m["type"] != "message":
                    continue
                try:
                    batch.append(decode_bus_message(m["data"]))
                except EventDecodeError as exc:
                    log.warning("skipping an event: %s", exc)
            if batch:
                yield batch

    async def history(self, count: int, before: str | None = None) -> list[ChatMessage]:
        """The last ``count`` chat messages (before stream id ``before``), oldest first.

        Joins and leaves share the stream; reading backwards page by page skips them, with a
        bound on pages so a room of only joins and leaves cannot make this scan for long.
        """
        found: list[ChatMessage] = []
        upper = f"({before}" if before else "+"
        with _unavailable_on_error("history"):
            for _ in range(HISTORY_PAGES):
                page = await self._commands.xrevrange(
                    keys.ROOM_STREAM, max=upper, min="-", count=max(4 * count, 64)
                )
                for raw_id, fields in page or ():
                    entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                    try:
                        event = decode_event(entry_id, (fields or {})[b"d"])
                    except (EventDecodeError, KeyError):
                        continue
                    if isinstance(event, ChatMessage):
                        found.append(event)
                        if len(found) == count:
                            return found[::-1]
                if not page or len(page) < max(4 * count, 64):
                    break
                last = page[-1][0]
                upper = "(" + (last.decode() if isinstance(last, bytes) else str(last))
        return found[::-1]

    async def events_after(self, event_id: str) -> list[RoomEvent]:
        """Every room event still in the stream after ``event_id``, oldest first."""
        with _unavailable_on_error("replay"):
            entries = await self._commands.xrange(keys.ROOM_STREAM, min=f"({event_id}")
        events: list[RoomEvent] = []
        for raw_id, fields in entries or ():
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            try:
                events.append(decode_event(entry_id, (fields or {})[b"d"]))
            except (EventDecodeError, KeyError) as exc:
                log.warning("skipping a stream entry %s: %s", entry_id, exc)
        return events

    # -- presence ------------------------------------------------------------------------

    async def claim(
        self,
        key: str,
        name: str,
        gateway: str,
        instance: str,
        session: str,
        since: float,
        announce: bool = True,
    ) -> Claim:
        """Claim name ``key`` for ``session``; on success the join is announced atomically
        (unless ``announce`` is False: restoring a user Redis forgot, who never left)."""
        result = await self._run(
            "claim",
            (),
            (key, name, gateway, session, int(since * 1000), instance, "1" if announce else "0"),
        )
        status = int(result[0])
        if status < 0:
            raise BrokerUnavailable(f"gateway {gateway} is not registered as live")
        if status == 0:
            return Claim(False)
        event_id = result[2].decode() if isinstance(result[2], bytes) else str(result[2])
        return Claim(True, int(result[1]), event_id)

    async def release(self, key: str, session: str, gateway: str = "") -> bool | None:
        """Free ``key`` if ``session`` still holds it, announcing the leave; True if it did.

        None: nobody holds it and ``gateway`` is not registered, so Redis may have lost its
        data; the gateway decides once registered again (see :meth:`force_leave`).
        """
        status = int(await self._run("release", (), (key, session, gateway)))
        return None if status < 0 else bool(status)

    async def force_leave(self, key: str, session: str, name: str, gateway: str) -> bool:
        """Announce the leave of a user whose presence Redis lost with its data, unless
        the name is held again by another session. True if announced."""
        return bool(
            await self._run(
                "force_leave",
                (keys.session_left(session),),
                (key, session, name, gateway, keys.LEFT_MARK_TTL_MS),
            )
        )

    async def epoch(self) -> str:
        """A token that stays the same for as long as Redis keeps its data: compare two
        readings to learn whether it restarted empty in between."""
        with _unavailable_on_error("epoch"):
            async with self._commands.pipeline(transaction=True) as pipe:
                pipe.set(keys.EPOCH, secrets.token_hex(8), nx=True)
                pipe.get(keys.EPOCH)
                _, value = await pipe.execute()
        return value.decode() if isinstance(value, bytes) else str(value)

    async def online(self) -> list[Presence]:
        """Everyone online, cluster-wide."""
        with _unavailable_on_error("online"):
            async with self._commands.pipeline(transaction=True) as pipe:
                pipe.hgetall(keys.ONLINE)
                pipe.hgetall(keys.ACTIVITY)
                records, activity = await pipe.execute()
        users = []
        for key, raw in records.items():
            fields = json.loads(raw)
            active = activity.get(key)
            users.append(
                Presence(
                    fields["name"],
                    fields["gateway"],
                    fields["session"],
                    fields["since_ms"] / 1000,
                    int(active) / 1000 if active is not None else None,
                )
            )
        return users

    async def touch(self, last_active: dict[str, float]) -> None:
        """Record users' last message times ({name key: Unix time}); one call per batch."""
        if last_active:
            args = [v for key, ts in last_active.items() for v in (key, int(ts * 1000))]
            await self._run("touch", (), args)

    async def kick(self, key: str, reason: str) -> Kick | None:
        """Ask the gateway holding name ``key`` to disconnect it. None: nobody has it."""
        result = await self._run("kick", (), (key, reason))
        if not int(result[0]):
            return None
        name, session, gateway = (
            v.decode() if isinstance(v, bytes) else str(v) for v in result[1:]
        )
        return Kick(name, session, gateway)

    async def announce(self, text: str) -> str:
        """Send a system line to every user on every gateway; returns its stream id."""
        (event_id,) = await self.publish([encode_announcement(text)])
        return event_id

    # -- gateway liveness ----------------------------------------------------------------

    async def register_gateway(
        self, gateway: str, instance: str, address: str, started: float, ttl: float
    ) -> int:
        """Mark ``gateway`` live. Users left behind by an earlier run under the same id are
        evicted (their leaves announced); returns how many. Raises :class:`GatewayIdInUse`
        if another live instance holds the id."""
        record = _gateway_record(gateway, instance, address, started, ttl)
        ok, evicted = await self._run("register", (), (gateway, instance, record, int(ttl * 1000)))
        if not int(ok):
            raise GatewayIdInUse(f"gateway id {gateway!r} is already used by a live gateway")
        return int(evicted)

    async def restore_gateway(
        self,
        gateway: str,
        instance: str,
        address: str,
        started: float,
        ttl: float,
        users: Sequence[tuple[str, str, str, float, bool]],
    ) -> list[str]:
        """Register again after the registration was lost, restoring ``users`` (name key,
        display name, session, since, announce-as-joining) in the same atomic step.
        Returns the keys another session holds by now; :class:`GatewayIdInUse` if another
        instance took the id."""
        args: list[Any] = [
            gateway,
            instance,
            _gateway_record(gateway, instance, address, started, ttl),
            int(ttl * 1000),
        ]
        for key, name, session, since, announce in users:
            args += [key, name, session, int(since * 1000), "1" if announce else "0"]
        refused = await self._run("restore", (), args)
        if refused and refused[0] == -1:
            raise GatewayIdInUse(f"gateway id {gateway!r} was taken by another instance")
        return [k.decode() if isinstance(k, bytes) else str(k) for k in refused]

    async def heartbeat(self, gateway: str, instance: str, ttl: float) -> bool:
        """Renew liveness. False means the registration was lost (reaped, or Redis lost its
        data) and must be made again; :class:`GatewayIdInUse` if another instance took it."""
        status = int(await self._run("heartbeat", (), (gateway, instance, int(ttl * 1000))))
        if status < 0:
            raise GatewayIdInUse(f"gateway id {gateway!r} was taken by another instance")
        return status == 1

    async def reap_dead_gateways(self) -> dict[str, int]:
        """Forget every gateway whose liveness expired, announcing its users' leaves once.
        Returns {gateway id: users evicted}."""
        flat = await self._run("reap", (), ())
        pairs = zip(flat[::2], flat[1::2], strict=True)
        return {(g.decode() if isinstance(g, bytes) else str(g)): int(n) for g, n in pairs}

    async def deregister_gateway(self, gateway: str, instance: str) -> int:
        """A clean stop: announce the leave of every user still held, forget the gateway."""
        return max(0, int(await self._run("deregister", (), (gateway, instance))))

    async def gateways(self) -> list[GatewayRecord]:
        """Every registered gateway, with its user count and time left on its liveness."""
        with _unavailable_on_error("gateways"):
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
