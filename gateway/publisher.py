"""The gateway's outgoing traffic, sent to Redis in the order it arrived.

One worker drains one queue, so a client's lines and its final leave reach Redis in the
order the client produced them (a leave never overtakes the last message, a message typed
before ``/join`` lands in the room it was typed in). Consecutive messages go out in one
script call per room, which is also what keeps Redis round trips per message low under load.
A busy gateway (:mod:`gateway.batching`) also waits up to a window between two calls, so
that each carries what came in meanwhile; never longer than it takes a call to fill up
(:data:`MAX_BATCH`), so that the window saves calls without capping what a gateway gets
through. One client still gets at most its limit of unpublished lines through per call
(``gateway.session.MAX_UNPUBLISHED``): none can take a busy gateway's whole capacity.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from broker import BrokerUnavailable, RedisBroker
from broker.events import encode_leave, encode_message
from gateway.batching import BUSY_RATE, Pacer
from gateway.metrics import Counts

log = logging.getLogger(__name__)

#: Messages per publish call. Bounds the size of one Lua call (and so how long Redis is
#: busy with it) while still cutting round trips by two orders of magnitude under load.
MAX_BATCH = 256


class Sender(Protocol):
    id: str

    def published(self, delivered: bool) -> None: ...


class Reader(Protocol):
    """A client whose input waits for the next batch (:meth:`Publisher.hold`)."""

    def read_now(self) -> None: ...


@dataclass(slots=True)
class _Message:
    sender: Sender
    room: str
    body: str


@dataclass(slots=True)
class _Release:
    session_id: str
    key: str
    name: str
    #: The rooms the user was in (two while a move was under way), whose members see it
    #: leave; the first is where a forced leave is announced.
    rooms: tuple[str, ...]
    #: Whether the cluster saw this user join, so that a leave is owed even if Redis
    #: forgot the user (False for a claim whose outcome was never known).
    owed: bool
    #: Redis lost its data since the claim: no release can find the user, so the leave
    #: is announced directly, on every retry too.
    forced: bool = False
    #: A leave went out already (only freeing the name failed): never forced again.
    announced: bool = False
    #: Rooms still to leave, from ``rooms``: a retry after a failure picks up here.
    left: int = 0


@dataclass(slots=True)
class _Barrier:
    """Done once everything queued before it has been handled."""

    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(slots=True)
class _Exclusive:
    """A step run by the worker itself, once everything queued before it is handled and
    before anything queued after it."""

    step: Callable[[], Awaitable[None]]
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


_Item = _Message | _Release | _Barrier | _Exclusive


class Publisher:
    """Ordered, batched publishing of messages and presence releases."""

    def __init__(
        self,
        broker: RedisBroker,
        gateway: str = "",
        counts: Counts | None = None,
        batch_window: float = 0.0,
        batch_rate: float = BUSY_RATE,
    ) -> None:
        """``batch_window``: seconds a busy gateway (its users sending over ``batch_rate``
        messages a second in all) waits between two publishing calls, at most (0: never
        waits)."""
        self._broker = broker
        self._gateway = gateway
        self._counts = counts if counts is not None else Counts()
        self._queue: deque[_Item] = deque()
        self._pacer = Pacer(batch_window, batch_rate)
        #: Clients whose input waits for the next batch: read just before it goes.
        self._held: set[Reader] = set()
        #: Set when the next call should not wait for the window: a call's worth is queued.
        self._hurry = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        #: Releases that failed (Redis down) or could not be settled (Redis may have lost
        #: its data): retried by :meth:`retry_releases`.
        self._failed: list[_Release] = []

    def message(self, sender: Sender, room: str, name: str, text: str) -> None:
        """Queue a chat line for ``room``; ``sender.published()`` is called once it is out
        (or refused)."""
        self._push(_Message(sender, room, encode_message(name, text)))
        if len(self._queue) >= MAX_BATCH:
            self._hurry.set()  # a full call's worth: waiting would save nothing

    def release(
        self, session_id: str, key: str, name: str, rooms: tuple[str, ...], owed: bool = True
    ) -> None:
        """Queue the release of a session's name (and its leave of ``rooms``), after
        everything it sent."""
        self._push(_Release(session_id, key, name, rooms, owed))

    async def barrier(self) -> None:
        """Wait until everything queued so far has been handled."""
        barrier = _Barrier()
        self._push(barrier)
        await barrier.done

    async def exclusive(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` with nothing else going to Redis from here meanwhile (a recovery:
        no release may slip in between its steps). Its exception, if any, is raised here."""
        item = _Exclusive(step)
        self._push(item)
        await item.done

    def retry_releases(self) -> None:
        """Queue again the releases that failed earlier."""
        failed, self._failed = self._failed, []
        for item in failed:
            self._push(item)

    def queued_releases(self) -> list[tuple[str, str, str, str]]:
        """(session id, name key, name, room) of the releases waiting in the queue, owed
        and not forced: users gone from here whose leave is still to be announced."""
        return [
            (item.session_id, item.key, item.name, item.rooms[0])
            for item in self._queue
            if isinstance(item, _Release) and item.owed and not item.forced and item.rooms
        ]

    def force_pending_releases(self) -> int:
        """Redis lost its data with these users' presence, so no release can find them:
        queue their leaves to be announced directly, now and on every retry. Returns how
        many were queued."""
        pending, self._failed = self._failed, []
        owed = [item for item in pending if item.owed]  # others: nobody saw them join
        for item in owed:
            item.forced = True
            self._push(item)
        return len(owed)

    async def drain(self) -> None:
        """Wait until everything queued so far has been handled."""
        await self._idle.wait()

    async def run(self) -> None:
        """The worker: runs until cancelled."""
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            if isinstance(head, _Message):
                await self._pace()
                await self._publish_batch()
                continue
            self._queue.popleft()
            if isinstance(head, _Release):
                await self._release(head)
            elif isinstance(head, _Exclusive):
                await self._run_exclusive(head)
            elif not head.done.done():
                head.done.set_result(None)

    @staticmethod
    async def _run_exclusive(item: _Exclusive) -> None:
        try:
            await item.step()
        except Exception as exc:  # the caller gets it
            if not item.done.done():
                item.done.set_exception(exc)
            return
        if not item.done.done():
            item.done.set_result(None)

    def _push(self, item: _Item) -> None:
        self._queue.append(item)
        self._idle.clear()
        self._wakeup.set()

    def hold(self, reader: Reader) -> bool:
        """While busy, ``reader`` (whose lines are queued) need not be read again before
        the next call: True, and it is read just before that call (:meth:`Reader.read_now`).
        A busy gateway thus reads each sender about once per window, not on every packet."""
        if not (self._pacer.busy and self._pacer.window):
            return False
        self._held.add(reader)
        return True

    async def _pace(self) -> None:
        """While busy, wait until the batch window since the last call is over; then take
        in the input held for it."""
        now = time.monotonic()
        due = self._pacer.due(now)
        if due > now and not self._hurry.is_set():
            self._counts.batches_delayed += 1
            # Whichever comes first: the window's end, or a full call's worth queued.
            timer = asyncio.get_running_loop().call_later(due - now, self._hurry.set)
            try:
                await self._hurry.wait()
            finally:
                timer.cancel()
        self._hurry.clear()
        if self._held:
            held, self._held = self._held, set()
            for reader in held:
                reader.read_now()
            # The reads come on the next loop iteration (after this task's next step on
            # the standard loop, before it on uvloop): let them, then send what they queued.
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    async def _publish_batch(self) -> None:
        by_room: dict[str, list[_Message]] = {}
        taken = 0
        while self._queue and taken < MAX_BATCH and isinstance(self._queue[0], _Message):
            message = self._queue.popleft()
            assert isinstance(message, _Message)
            by_room.setdefault(message.room, []).append(message)
            taken += 1
        now = time.monotonic()
        self._pacer.arrived(taken, now)
        self._pacer.sent(now)
        for room, batch in by_room.items():
            await self._publish_room(room, batch)

    async def _publish_room(self, room: str, batch: list[_Message]) -> None:
        delivered = False
        try:
            await self._broker.publish(room, [m.body for m in batch])
            delivered = True
        except BrokerUnavailable as exc:
            self._counts.redis_errors += 1
            log.warning("could not publish %d message(s): %s", len(batch), exc)
        except Exception:
            log.exception("unexpected error publishing %d message(s)", len(batch))
        for message in batch:
            message.sender.published(delivered)

    async def _release(self, item: _Release) -> None:
        leave = encode_leave(item.name, self._gateway, item.session_id)
        try:
            if item.forced:
                if not item.announced:
                    await self._broker.force_leave(item.rooms[0], item.session_id, leave)
                return
            # The leave first: nobody can take the name before its old holder is seen go.
            while item.left < len(item.rooms):
                room = item.rooms[item.left]
                (event_id,) = await self._broker.leave(room, [(item.session_id, leave)])
                item.announced = item.announced or bool(event_id)
                item.left += 1
            settled = await self._broker.release(item.key, item.session_id, self._gateway)
        except BrokerUnavailable as exc:
            self._counts.redis_errors += 1
            log.warning("could not release %r yet: %s", item.key, exc)
            self._failed.append(item)
            return
        except Exception:
            log.exception("unexpected error releasing %r", item.key)
            return
        if settled is None:  # we are not registered: decided when we are again
            self._failed.append(item)
