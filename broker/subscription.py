"""One gateway's live view of the bus: a single pub/sub connection carrying its inbox and
the channels of exactly the rooms it hosts, changed as rooms come and go.

A room is added with :meth:`Subscription.add`, which returns once Redis confirms the
subscription: only then may a user's join be announced there, or the gateway would miss
what follows it. Confirmations are read by whoever iterates :meth:`Subscription.batches`
(the gateway's relay); :meth:`Subscription.open` reads its first ones itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

import redis.exceptions
from redis.asyncio.client import PubSub

from broker import keys
from broker.bulk import BulkReader, Reply
from broker.connection import COMMAND_TIMEOUT, HEALTH_CHECK_INTERVAL
from broker.errors import BrokerUnavailable, EventDecodeError
from broker.events import InboxEvent, RoomEvent, decode_bus_message, decode_inbox
from broker.translate import unavailable_on_error, unavailable_on_teardown

log = logging.getLogger(__name__)

#: Messages taken from the connection in one go, at most: large enough to amortise a
#: write per client over many messages, small enough to keep each pass short.
MAX_BATCH = 512
#: Seconds to wait for Redis to confirm a subscription.
CONFIRM_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Resubscribed:
    """A room's subscription was lost and is made again (on a cluster: its slot moved, or
    its node failed over): what was published meanwhile is in the room's stream."""


#: One delivery: (folded room name, event or marker) for a room, (None, event) for the inbox.
Delivery = tuple[str | None, RoomEvent | InboxEvent | Resubscribed]


class BusSubscription(Protocol):
    """What a gateway's relay needs of its subscription, on any deployment."""

    #: Folded names of the rooms subscribed (or being subscribed) to.
    rooms: set[str]

    async def open(self, rooms: Iterable[str]) -> None: ...
    async def add(self, room: str) -> None: ...
    async def remove(self, room: str) -> None: ...
    def batches(self) -> AsyncIterator[list[Delivery]]: ...
    async def deliver_to(self, sink: Callable[[list[Delivery]], None]) -> None: ...
    async def close(self) -> None: ...


def _channel(room: str) -> str:
    return keys.room(room).channel


def decode_message(channel: str, data: bytes | str, inbox: str) -> Delivery | None:
    """The delivery a bus message on ``channel`` carries (None: not one of ours, or
    undecodable, which is logged)."""
    try:
        if channel == inbox:
            return None, decode_inbox(data)
        if (room := keys.room_of_channel(channel)) is not None:
            return room, decode_bus_message(data)
    except EventDecodeError as exc:
        log.warning("skipping an event: %s", exc)
    return None


class Subscription:
    """The inbox of one gateway plus the rooms it hosts, on one connection."""

    def __init__(self, pubsub: PubSub, gateway: str, inbox: bool = True) -> None:
        """Without ``inbox``, the rooms only: the connection is then held subscribed by an
        anchor channel that nothing is published on. redis-py sends a health-check PING
        and reads its answer itself when it sends a command on a pub/sub connection with
        no subscription left, racing the reader of :meth:`batches` for the socket."""
        self._pubsub = pubsub
        self._inbox = keys.gateway_inbox(gateway)
        self._first = self._inbox if inbox else keys.gateway_anchor(gateway)
        self._confirming: dict[str, asyncio.Future[None]] = {}
        self._early: list[Reply] = []
        self._reader: BulkReader | None = None
        #: Folded names of the rooms subscribed (or being subscribed) to.
        self.rooms: set[str] = set()

    async def open(self, rooms: Iterable[str]) -> None:
        """Subscribe to the inbox and ``rooms`` and wait, reading, for Redis to confirm."""
        rooms = list(rooms)
        channels = [self._first, *map(_channel, rooms)]
        self.rooms.update(rooms)
        waiting = set(channels)
        with unavailable_on_error("subscribe"):
            await self._pubsub.subscribe(*channels)
            reader = self._reader = BulkReader(self._pubsub, HEALTH_CHECK_INTERVAL, COMMAND_TIMEOUT)
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                while waiting:
                    for reply in await reader.read(MAX_BATCH):
                        if reply[0] == "subscribe":
                            waiting.discard(reply[1])
                        else:
                            self._early.append(reply)

    async def add(self, room: str) -> None:
        """Subscribe to ``room`` and return once Redis confirms it (:class:`BrokerUnavailable`
        if it does not in time)."""
        channel = keys.room(room).channel
        future = asyncio.get_running_loop().create_future()
        self._confirming[channel] = future
        self.rooms.add(room)
        try:
            with unavailable_on_teardown("subscribe"):
                await self._pubsub.subscribe(channel)
                async with asyncio.timeout(CONFIRM_TIMEOUT):
                    await future
        except TimeoutError:
            raise BrokerUnavailable(f"no confirmation of the subscription to {room}") from None
        finally:
            self._confirming.pop(channel, None)

    async def remove(self, room: str) -> None:
        """Stop receiving ``room`` (what is already on its way may still arrive)."""
        self.rooms.discard(room)
        with unavailable_on_teardown("unsubscribe"):
            await self._pubsub.unsubscribe(keys.room(room).channel)

    async def batches(self) -> AsyncIterator[list[Delivery]]:
        """The events received, in arrival order, every batch what has arrived so far.
        Raises :class:`BrokerUnavailable` when the link breaks."""
        reader = self._reader
        assert reader is not None, "batches() before open()"
        if self._early:
            early, self._early = self._early, []
            yield self._decode(early)
        while True:
            with unavailable_on_error("subscription"):
                replies = await reader.read(MAX_BATCH)
            batch = self._decode(replies)
            if batch:
                yield batch

    async def deliver_to(self, sink: Callable[[list[Delivery]], None]) -> None:
        """Hand ``sink`` every batch of events as it arrives, in arrival order, until the
        link breaks (:class:`BrokerUnavailable`). In bulk, ``sink`` runs as the bytes come
        in: no task is woken per message."""
        reader = self._reader
        assert reader is not None, "deliver_to() before open()"

        def take(replies: list[Reply]) -> None:
            if batch := self._decode(replies):
                sink(batch)

        early, self._early = self._early, []
        take(early)
        with unavailable_on_error("subscription"):
            await reader.run(take, MAX_BATCH)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        with suppress(redis.exceptions.RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    def _decode(self, replies: list[Reply]) -> list[Delivery]:
        batch: list[Delivery] = []
        for kind, channel, data in replies:
            if kind == "message":
                delivery = decode_message(channel, data, self._inbox)
                if delivery is not None:
                    batch.append(delivery)
            elif kind == "subscribe":
                future = self._confirming.get(channel)
                if future is not None and not future.done():
                    future.set_result(None)
        return batch


class SplitSubscription:
    """Under Sentinel: the rooms read on a replica, the inbox on the primary.

    A room event reaches users only once a replica has it, so whatever anyone saw survives
    the primary's failover, and the new primary's stream can replay it to those who missed
    it. Private messages and kicks are not kept anywhere: they go by the primary, which
    tells the sender whether the recipient's gateway was listening.
    """

    def __init__(self, rooms: PubSub, inbox: PubSub, gateway: str) -> None:
        self._rooms = Subscription(rooms, gateway, inbox=False)
        self._inbox = Subscription(inbox, gateway)
        #: Folded names of the rooms subscribed (or being subscribed) to.
        self.rooms = self._rooms.rooms

    async def open(self, rooms: Iterable[str]) -> None:
        await asyncio.gather(self._inbox.open(()), self._rooms.open(rooms))

    async def add(self, room: str) -> None:
        await self._rooms.add(room)

    async def remove(self, room: str) -> None:
        await self._rooms.remove(room)

    async def deliver_to(self, sink: Callable[[list[Delivery]], None]) -> None:
        """Hand ``sink`` each batch of :meth:`batches` (both connections) as it comes."""
        async for batch in self.batches():
            sink(batch)

    async def batches(self) -> AsyncIterator[list[Delivery]]:
        """Both connections' batches as they come."""
        sources = [self._inbox.batches(), self._rooms.batches()]
        waiting = {asyncio.ensure_future(anext(source)): source for source in sources}
        try:
            while True:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    source = waiting.pop(future)
                    batch = future.result()
                    waiting[asyncio.ensure_future(anext(source))] = source
                    yield batch
        finally:
            for future in waiting:
                future.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)

    async def close(self) -> None:
        await asyncio.gather(self._inbox.close(), self._rooms.close())
