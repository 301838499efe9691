"""One gateway's live view of the bus on a Redis Cluster: sharded pub/sub, one connection
per node serving a room the gateway hosts (or its inbox).

Each room's channel lives in the room's slot, so its events are published (``SPUBLISH``, in
the room's scripts) on the primary that owns that slot and read there or, when it has one,
on its replica (a line read there is on the node a failover promotes): a shard carries only
the traffic of its own rooms. The nodes come and go independently:

* a slot that migrates to another node ends its subscriptions there: Redis pushes a
  ``sunsubscribe`` for each of its channels;
* a node that fails breaks its connection (at once, or when the periodic PING gets no
  answer); its replica takes over its slots;
* a subscription sent to a node that no longer owns the slot is answered ``MOVED``.

In each case the channels concerned are subscribed again on the slots' owner, as the
cluster now maps them, and once that is confirmed a :class:`Resubscribed` marker follows
in the deliveries, for each room: what was published meanwhile is in the room's stream, for
the reader to replay. Other rooms go on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import suppress
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from broker import keys
from broker.bulk import BulkReader, Reply
from broker.connection import COMMAND_TIMEOUT, CONNECT_TIMEOUT, HEALTH_CHECK_INTERVAL
from broker.errors import BrokerUnavailable
from broker.subscription import (
    CONFIRM_TIMEOUT,
    MAX_BATCH,
    Delivery,
    Resubscribed,
    decode_message,
)
from broker.translate import unavailable_on_teardown

log = logging.getLogger(__name__)

#: Backoff bounds, seconds, while a lost channel waits for its slot's new owner.
REGAIN_MIN, REGAIN_MAX = 0.05, 1.0
#: The kind of a queued marker (no reply from Redis is of that kind): a room subscribed
#: again, its name in place of the channel.
RESUBSCRIBED = "resubscribed"
#: Seconds between two readings of the cluster's map, after which a room read elsewhere
#: than where it should be (a replica added, or back after a failover) moves there.
MAP_REFRESH = 5.0


async def _connect_read_only(connection: Any) -> None:
    """Set up a connection to a replica: READONLY, so that it serves its primary's slots."""
    await connection.on_connect()
    await connection.send_command("READONLY")
    await connection.read_response()


class _Shard:
    """The subscription connection to one node, and the channels subscribed there."""

    def __init__(
        self, name: str, node: ClusterNode, client_name: str, connection_kwargs: dict[str, Any]
    ):
        self.name = name
        self.client = aioredis.Redis(
            host=node.host,
            port=int(node.port),
            client_name=client_name,
            redis_connect_func=_connect_read_only,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            socket_keepalive=True,
            health_check_interval=HEALTH_CHECK_INTERVAL,
            **connection_kwargs,
        )
        self.pubsub = self.client.pubsub()
        self.channels: set[str] = set()
        #: Unsubscriptions sent on purpose and not yet answered, per channel: their
        #: ``sunsubscribe`` is no news, even when the channel was subscribed again since
        #: (the answers come in the order the commands went).
        self.leaving: Counter[str] = Counter()
        self.reader: asyncio.Task[None] | None = None
        #: One command sent at a time: the first one connects, and redis-py's PubSub
        #: would open a second connection for another command sent meanwhile.
        self._sending = asyncio.Lock()

    async def subscribe(self, channel: str) -> None:
        async with self._sending:
            await self.pubsub.ssubscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        """Leave ``channel`` on purpose: its ``sunsubscribe`` is expected."""
        self.leaving[channel] += 1
        async with self._sending:
            await self.pubsub.sunsubscribe(channel)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self.reader
        with suppress(redis.exceptions.RedisError, OSError):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        with suppress(redis.exceptions.RedisError, OSError):
            await self.client.aclose()


class ShardedSubscription:
    """The inbox of one gateway plus the rooms it hosts, over the nodes of a cluster."""

    def __init__(self, cluster: RedisCluster, gateway: str) -> None:
        self._cluster = cluster
        self._inbox = keys.gateway_inbox(gateway)
        #: Named in CLIENT LIST (which allows no spaces in a name).
        self._client_name = "".join("_" if c.isspace() else c for c in f"{gateway}:bus")
        self._shards: dict[str, _Shard] = {}
        #: Channel -> the node it is subscribed on (or being subscribed on).
        self._where: dict[str, str] = {}
        self._confirming: dict[str, asyncio.Future[None]] = {}
        #: Messages received (smessage) and markers, in the order they came.
        self._queue: asyncio.Queue[list[Reply]] = asyncio.Queue()
        self._lost: set[str] = set()
        self._regain: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._closed = False
        kwargs = cluster.get_connection_kwargs()
        self._connection_kwargs = {
            k: kwargs[k] for k in ("username", "password", "ssl") if kwargs.get(k) is not None
        }
        #: Folded names of the rooms subscribed (or being subscribed) to.
        self.rooms: set[str] = set()

    # -- the subscription's interface (as :class:`broker.subscription.Subscription`) ------

    async def open(self, rooms: Iterable[str]) -> None:
        """Subscribe to the inbox and ``rooms``, each on its node, and wait for every node
        to confirm."""
        rooms = list(rooms)
        self.rooms.update(rooms)
        await asyncio.gather(
            self._subscribe(self._inbox), *(self._subscribe(keys.room(r).channel) for r in rooms)
        )
        self._watch = asyncio.create_task(self._follow_map())

    async def add(self, room: str) -> None:
        """Subscribe to ``room`` on its node and return once the node confirms it."""
        self.rooms.add(room)
        await self._subscribe(keys.room(room).channel)

    async def remove(self, room: str) -> None:
        """Stop receiving ``room``; its node's connection closes with its last room."""
        self.rooms.discard(room)
        channel = keys.room(room).channel
        self._lost.discard(channel)
        shard = self._shards.get(self._where.pop(channel, ""))
        if shard is None or channel not in shard.channels:
            return
        shard.channels.discard(channel)
        if not shard.channels:
            self._drop(shard)
            return
        with unavailable_on_teardown("unsubscribe"):
            await shard.unsubscribe(channel)

    async def deliver_to(self, sink: Callable[[list[Delivery]], None]) -> None:
        """Hand ``sink`` each batch of :meth:`batches` (every node) as it comes."""
        async for batch in self.batches():
            sink(batch)

    async def batches(self) -> AsyncIterator[list[Delivery]]:
        """The events received from every node, in arrival order per node, each batch what
        has arrived so far; :class:`Resubscribed` markers where rooms were subscribed again."""
        while True:
            items = await self._queue.get()
            while len(items) < MAX_BATCH and not self._queue.empty():
                items += self._queue.get_nowait()
            batch: list[Delivery] = []
            for kind, channel, data in items:
                if kind == RESUBSCRIBED:  # channel: the room's folded name
                    batch.append((channel, Resubscribed()))
                    continue
                delivery = decode_message(channel, data, self._inbox)
                if delivery is not None:
                    batch.append(delivery)
            if batch:
                yield batch

    async def close(self) -> None:
        self._closed = True
        for task in (self._regain, self._watch):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await task
        shards, self._shards = list(self._shards.values()), {}
        await asyncio.gather(*(shard.close() for shard in shards), *self._closing)

    # -- subscribing ---------------------------------------------------------------------

    async def _subscribe(self, channel: str) -> None:
        future = asyncio.get_running_loop().create_future()
        self._confirming[channel] = future
        try:
            with unavailable_on_teardown("subscribe"):
                await self._send_subscribe(channel)
                async with asyncio.timeout(CONFIRM_TIMEOUT):
                    await future
        except TimeoutError:
            raise BrokerUnavailable(f"no confirmation of the subscription to {channel}") from None
        finally:
            if self._confirming.get(channel) is future:
                del self._confirming[channel]

    def _node_for(self, channel: str) -> ClusterNode:
        """Where to read ``channel``: a room on a replica of its slot's primary (a line
        read there is one the replica has, which a failover keeps), the inbox on the
        primary (which counts who receives a private message); the primary if it has no
        replica."""
        owners = self._cluster.nodes_manager.slots_cache.get(self._cluster.keyslot(channel))
        if not owners:
            raise BrokerUnavailable(f"no node owns the slot of {channel}")
        if channel == self._inbox or len(owners) < 2:
            return owners[0]
        return owners[1]

    async def _send_subscribe(self, channel: str) -> None:
        node = self._node_for(channel)
        shard = self._shards.get(node.name)
        if shard is None:
            shard = self._shards[node.name] = _Shard(
                node.name, node, self._client_name, self._connection_kwargs
            )
        self._where[channel] = node.name
        shard.channels.add(channel)
        try:
            await shard.subscribe(channel)
        except BaseException:
            shard.channels.discard(channel)
            self._where.pop(channel, None)
            if not shard.channels and shard.reader is None:
                self._drop(shard)
            raise
        if shard.reader is None:
            shard.reader = asyncio.create_task(self._read(shard))

    async def _read(self, shard: _Shard) -> None:
        """Hand over what ``shard`` receives; on a broken link, its channels are lost."""
        reader = BulkReader(shard.pubsub, HEALTH_CHECK_INTERVAL, COMMAND_TIMEOUT)
        try:
            while True:
                try:
                    replies = await reader.read(MAX_BATCH)
                except redis.exceptions.ResponseError as exc:
                    words = str(exc).split()
                    if words[:1] != ["MOVED"] or len(words) < 2 or not words[1].isdigit():
                        raise
                    # A subscription sent on a stale slot map: send it again once the map
                    # is refreshed.
                    log.info("subscription on %s answered %s", shard.name, exc)
                    slot = int(words[1])
                    self._lose([c for c in shard.channels if key_slot(c.encode()) == slot], shard)
                    continue
                messages: list[Reply] = []
                for reply in replies:
                    if reply[0] == "smessage":
                        messages.append(reply)
                        continue
                    if messages:  # before what this reply may queue (a marker)
                        self._queue.put_nowait(messages)
                        messages = []
                    self._receive(shard, reply)
                if messages:
                    self._queue.put_nowait(messages)
        except asyncio.CancelledError:
            raise
        except (redis.exceptions.RedisError, OSError) as exc:
            if self._shards.get(shard.name) is shard and not self._closed:
                reason = str(exc) or type(exc).__name__
                log.warning("lost the bus subscription on %s (%s)", shard.name, reason)
                shard.reader = None  # this task ends here; close() must not await it
                self._lose(list(shard.channels), shard)
        finally:
            reader.close()

    def _receive(self, shard: _Shard, reply: Reply) -> None:
        kind, channel, _ = reply
        if kind == "ssubscribe":
            was_lost = channel in self._lost
            self._lost.discard(channel)
            future = self._confirming.get(channel)
            if future is not None and not future.done():
                future.set_result(None)
            elif was_lost:
                self._regained(channel)
        elif kind == "sunsubscribe":
            if shard.leaving[channel]:
                shard.leaving[channel] -= 1
                if not shard.leaving[channel]:
                    del shard.leaving[channel]
            elif channel in shard.channels:
                # Not asked for: the channel's slot has moved to another node.
                log.info("%s left %s: its slot moved", channel, shard.name)
                self._lose([channel], shard)

    # -- following the cluster's map ------------------------------------------------------

    async def _follow_map(self) -> None:
        """Read the map again now and then; move a channel read where it should not be."""
        while True:
            await asyncio.sleep(MAP_REFRESH)
            with suppress(redis.exceptions.RedisError, OSError):
                await self._cluster.nodes_manager.initialize()
            for channel, where in list(self._where.items()):
                if channel in self._confirming or channel in self._lost:
                    continue
                try:
                    node = self._node_for(channel)
                except BrokerUnavailable:
                    continue
                if node.name != where and (shard := self._shards.get(where)) is not None:
                    log.info("reading %s on %s from now on, not %s", channel, node.name, where)
                    self._lose([channel], shard)
                    if shard.channels:
                        with suppress(redis.exceptions.RedisError, OSError, AttributeError):
                            await shard.unsubscribe(channel)

    # -- regaining lost channels ---------------------------------------------------------

    def _lose(self, channels: list[str], shard: _Shard) -> None:
        for channel in channels:
            shard.channels.discard(channel)
            if self._where.get(channel) == shard.name:
                del self._where[channel]
            if channel in self._confirming or self._wanted(channel):
                self._lost.add(channel)
        if not shard.channels or shard.reader is None:
            self._drop(shard)
        if self._lost and (self._regain is None or self._regain.done()):
            self._regain = asyncio.create_task(self._regain_lost())

    def _drop(self, shard: _Shard) -> None:
        """Forget ``shard`` and close its connection (in the background: its reader may be
        the caller)."""
        if self._shards.get(shard.name) is shard:
            del self._shards[shard.name]
        task = asyncio.create_task(shard.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _wanted(self, channel: str) -> bool:
        room = keys.room_of_channel(channel)
        return channel == self._inbox or (room is not None and room in self.rooms)

    async def _regain_lost(self) -> None:
        """Subscribe the lost channels again on their slots' owners, as the cluster maps
        them once it has settled."""
        delay = REGAIN_MIN
        while self._lost and not self._closed:
            with suppress(redis.exceptions.RedisError, OSError):
                await self._cluster.nodes_manager.initialize()
            for channel in sorted(self._lost):
                if not (channel in self._confirming or self._wanted(channel)):
                    self._lost.discard(channel)
                    continue
                if channel in self._where:  # sent; its confirmation settles it
                    continue
                try:
                    await self._send_subscribe(channel)
                except (redis.exceptions.RedisError, OSError, BrokerUnavailable) as exc:
                    self._where.pop(channel, None)
                    log.info("cannot subscribe to %s again yet: %s", channel, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, REGAIN_MAX)
            # Sent but never confirmed (the node went too): try the map again.
            for channel in self._lost:
                if self._where.get(channel) not in self._shards:
                    self._where.pop(channel, None)

    def _regained(self, channel: str) -> None:
        room = keys.room_of_channel(channel)
        log.info("subscribed to %s again on %s", channel, self._where.get(channel))
        if room is not None and room in self.rooms:
            self._queue.put_nowait([(RESUBSCRIBED, room, None)])
