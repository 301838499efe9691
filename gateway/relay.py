"""The bus, as one gateway receives it: one subscription carrying this gateway's inbox and
the rooms it hosts, re-made (and each room's gap replayed from its stream) when the link
breaks.

A room is hosted from the moment one of this gateway's users is about to enter it
(:meth:`Relay.host`, which returns once the subscription is confirmed, so that nothing after
the user's join is missed) until its last local member has gone (:meth:`Relay.release`).
Inbound traffic is thus proportional to the rooms a gateway hosts, not to the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from broker import (
    BrokerUnavailable,
    BusSubscription,
    ChatRun,
    Delivery,
    InboxEvent,
    PrivateDelivery,
    RedisBroker,
    Resubscribed,
    RoomEvent,
    UserKicked,
)
from gateway.metrics import Counts
from gateway.rooms import Member, Room, Rooms

log = logging.getLogger(__name__)

#: Seconds the subscription may be down before users are told: a reconnect that succeeds
#: at once (a blip, replayed from the streams) is not worth alarming anyone.
DOWN_NOTICE_DELAY = 1.0
#: Backoff bounds, seconds, for subscribing again after the link broke.
RETRY_MIN, RETRY_MAX = 0.1, 5.0
#: Seconds a user entering a room waits, at most, for a subscription that is down to be
#: made again (at once: the backoff's pause is cut short for them).
RESUBSCRIBE_WAIT = 2.0
#: Live events held per room while its gap is replayed, at most: past that they are let
#: go, and fetched from the room's stream by another round of the replay.
MAX_HELD_EVENTS = 10_000


class Relay:
    """Bus -> local rooms and inbox, for one gateway."""

    def __init__(
        self,
        broker: RedisBroker,
        gateway: str,
        rooms: Rooms,
        on_inbox: Callable[[InboxEvent], None],
        on_service: Callable[[bool], None],
        counts: Counts | None = None,
    ) -> None:
        """``on_inbox`` takes each inbox event; ``on_service(up)`` is told when the bus has
        been down long enough to tell users, and when it is back after that. ``counts``:
        where Redis errors, reconnects and replayed events are counted (the rooms'
        tallies when not given)."""
        self._counts = counts if counts is not None else rooms.counts
        self._broker = broker
        self._gateway = gateway
        self._rooms = rooms
        self._on_inbox = on_inbox
        self._on_service = on_service
        self._subscription: BusSubscription | None = None
        #: Set while the subscription is up (made and caught up).
        self._live = asyncio.Event()
        #: Set to cut the pause before the next try short: someone is waiting.
        self._hurry = asyncio.Event()
        self._changes = asyncio.Lock()
        self._unsubscribing: set[asyncio.Task[None]] = set()
        self._down_notice: asyncio.TimerHandle | None = None
        self._told_down = False
        #: Set once the first subscription is made (start-up waits for it).
        self.subscribed = asyncio.Event()
        #: Whether the subscription is up now.
        self.up = False
        #: Messages received from the bus (room events and inbox; a run counts each of its
        #: messages), for ``GET /stats``.
        self.received = 0
        #: Rooms subscribed again by themselves (on a cluster) whose gap is being replayed:
        #: the live events held meanwhile (None: too many, replay once more).
        self._replaying: dict[str, list[RoomEvent] | None] = {}
        self._replays: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Subscribe and deliver, subscribing again (and replaying) when the link breaks."""
        try:
            await self._run()
        finally:
            self._stop_replays()

    async def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            self._stop_replays()  # a new subscription replays every room itself
            try:
                hosted = [room.key for room in self._rooms]
                async with self._broker.subscription(self._gateway, hosted) as subscription:
                    self._subscription = subscription
                    await self._catch_up()
                    if self.subscribed.is_set():
                        self._counts.bus_reconnects += 1
                        log.info("bus subscription restored")
                    self.subscribed.set()
                    self._live.set()
                    self._service_up()
                    delay = RETRY_MIN
                    await subscription.deliver_to(self._deliver)
            except BrokerUnavailable as exc:
                self._counts.redis_errors += 1
                log.warning("bus subscription lost (%s); retrying in %.1fs", exc, delay)
            finally:
                self._subscription = None
                self._live.clear()
            self._service_down()
            await self._pause(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` seconds before the next try, or only the shortest pause if a
        user is waiting (or comes to wait meanwhile)."""
        await asyncio.sleep(RETRY_MIN)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay - RETRY_MIN):
                await self._hurry.wait()
        self._hurry.clear()

    async def _live_subscription(self) -> BusSubscription:
        """The subscription; if it is down, made again at once (waiting at most
        :data:`RESUBSCRIBE_WAIT`), else :class:`BrokerUnavailable`."""
        if self._subscription is None:
            self._hurry.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESUBSCRIBE_WAIT):
                    await self._live.wait()
        if self._subscription is None:
            raise BrokerUnavailable("the bus subscription is down")
        return self._subscription

    async def host(self, key: str, member: Member) -> tuple[Room, asyncio.Future[None]]:
        """Host room ``key`` for ``member``, who is about to enter it: returns the room and
        a future done once its join event has admitted the member. Raises
        :class:`BrokerUnavailable` (the room released again) if the bus is down."""
        room = self._rooms.open(key)
        admitted = room.expect(member)
        try:
            async with self._changes:
                subscription = await self._live_subscription()
                if key not in subscription.rooms:
                    await subscription.add(key)
        except BaseException:
            room.forget(member)
            self.release(key)
            raise
        return room, admitted

    def release(self, key: str) -> None:
        """Stop hosting ``key`` if no local member is in it or on the way."""
        if not self._rooms.close_if_empty(key):
            return
        subscription = self._subscription
        if subscription is not None and key in subscription.rooms:
            subscription.rooms.discard(key)
            task = asyncio.create_task(self._unsubscribe(subscription, key))
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, subscription: BusSubscription, key: str) -> None:
        async with self._changes:
            if self._rooms.get(key) is not None or subscription is not self._subscription:
                return  # hosted again meanwhile, or the link was re-made without it
            try:
                await subscription.remove(key)
            except BrokerUnavailable as exc:
                log.debug("unsubscribing from %s: %s", key, exc)  # the link is being re-made

    async def _catch_up(self) -> None:
        for room in self._rooms:
            if room.last_event is None:
                continue
            missed = await self._broker.events_after(room.key, room.last_event)
            self._log_replay(room, missed)
            self._deliver_room(room, missed)

    def _log_replay(self, room: Room, missed: list[RoomEvent]) -> None:
        if missed:
            self._counts.events_replayed += len(missed)
            log.info("replaying %d event(s) of %s missed while unsubscribed", len(missed),
                     room.key)  # fmt: skip

    def _deliver(self, batch: list[Delivery]) -> None:
        """Deliver a batch. A room subscribed again by itself (:class:`Resubscribed`) has
        its gap replayed in the background, its live events held until that is done."""
        self.received += len(batch)
        by_room: dict[str, list[RoomEvent]] = {}
        for key, event in batch:
            if isinstance(event, ChatRun):  # counted as the messages it carries
                self.received += len(event.ids) - 1
            if isinstance(event, PrivateDelivery | UserKicked):
                try:
                    self._on_inbox(event)
                except Exception:
                    log.exception("unexpected error handling %r", event)
            elif key is None:
                continue
            elif isinstance(event, Resubscribed):
                self._deliver_rooms(by_room)  # what came before the marker, first
                by_room = {}
                self._counts.bus_reconnects += 1
                self._start_replay(key)
            elif key in self._replaying:
                held = self._replaying[key]
                if held is not None and len(held) < MAX_HELD_EVENTS:
                    held.append(event)
                else:
                    self._replaying[key] = None
            else:
                by_room.setdefault(key, []).append(event)
        self._deliver_rooms(by_room)

    def _start_replay(self, key: str) -> None:
        if key in self._replaying:  # under way: it must look at the stream once more
            self._replaying[key] = None
            return
        self._replaying[key] = []
        task = asyncio.create_task(self._replay(key))
        self._replays.add(task)
        task.add_done_callback(self._replays.discard)

    async def _replay(self, key: str) -> None:
        """Deliver what room ``key``'s stream holds after the last event delivered, then
        the live events held meanwhile; retried until Redis answers (its node may be
        failing over), while the other rooms go on."""
        delay = RETRY_MIN
        while (room := self._rooms.get(key)) is not None:
            try:
                missed = (
                    await self._broker.events_after(key, room.last_event)
                    if room.last_event is not None
                    else []
                )
            except BrokerUnavailable as exc:
                self._counts.redis_errors += 1
                log.warning("cannot replay %s yet (%s); retrying in %.1fs", key, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            room = self._rooms.get(key)
            if room is None:
                break
            self._log_replay(room, missed)
            self._deliver_room(room, missed)
            held = self._replaying.get(key)
            if held is None:  # some were let go, or the room was lost again: once more
                self._replaying[key] = []
                continue
            del self._replaying[key]
            self._deliver_room(room, held)
            return
        self._replaying.pop(key, None)

    def _stop_replays(self) -> None:
        for task in self._replays:
            task.cancel()
        self._replaying.clear()

    def _deliver_rooms(self, by_room: dict[str, list[RoomEvent]]) -> None:
        for key, events in by_room.items():
            room = self._rooms.get(key)
            if room is not None:
                self._deliver_room(room, events)

    @staticmethod
    def _deliver_room(room: Room, events: list[RoomEvent]) -> None:
        try:
            room.deliver_batch(events)
        except Exception:
            log.exception("unexpected error delivering %d event(s) of %s", len(events), room.key)

    def _service_down(self) -> None:
        self.up = False
        if self._down_notice is None and not self._told_down:
            self._down_notice = asyncio.get_running_loop().call_later(
                DOWN_NOTICE_DELAY, self._tell_down
            )

    def _tell_down(self) -> None:
        self._down_notice = None
        if not self.up:
            self._told_down = True
            self._on_service(False)

    def _service_up(self) -> None:
        self.up = True
        if self._down_notice is not None:
            self._down_notice.cancel()
            self._down_notice = None
        if self._told_down:
            self._told_down = False
            self._on_service(True)
