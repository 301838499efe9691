"""The rooms as one gateway sees them: each room's local members, and fan-out of its events
to them.

Events arrive from the bus in the room's stream order; each is encoded once and the same
bytes are written to every local member. A member's own join event is the moment it starts
receiving the room, and its own leave event (when it moves on) the moment it stops:
everything between reaches it, nothing else, on every gateway alike.

A busy room's lines wait up to a window to go out together (:mod:`gateway.batching`).
Whatever else the room writes (a notice, a summary) and a member's own join or leave first
write what is waiting, so that everyone gets the same order, and exactly what came
between their join and their leave.

Entering a room is done in two steps so that the newcomer sees its welcome (or the room's
name and size) and the room's history before the live traffic that follows its join:
:meth:`Room.expect` before the join is announced, :meth:`Room.enter` once the history is
at hand. Traffic that arrives in between is held for the newcomer, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Protocol

from broker import (
    Announcement,
    ChatMessage,
    ChatRun,
    RoomEvent,
    UserJoined,
    UserLeft,
    stream_id_key,
)
from chatwire.texts import (
    announcement_text,
    chat_line,
    joined_text,
    left_text,
    moved_in_text,
    moved_out_text,
    notice_line,
    summary_text,
)
from gateway.batching import BUSY_RATE, Pacer
from gateway.metrics import Counts

log = logging.getLogger(__name__)

#: Seconds between join/leave summaries in a busy room.
SUMMARY_PERIOD = 1.0
#: Room events held for a newcomer while its history is fetched (a few milliseconds at
#: most, unless Redis stalls; past this the newcomer is cut rather than buffered without end).
MAX_HELD_CHUNKS = 10_000


class Member(Protocol):
    """What a room needs of a session."""

    id: str
    closed: bool

    def write(self, data: bytes) -> None: ...
    def abort(self) -> None: ...


def _arrival_text(event: UserJoined) -> str:
    return moved_in_text(event.name, event.room) if event.room else joined_text(event.name)


def _departure_text(event: UserLeft) -> str:
    return moved_out_text(event.name, event.to) if event.to else left_text(event.name)


def _phrase(event: UserJoined | UserLeft) -> str:
    """What follows the name(s) in a notice about ``event``."""
    text = _arrival_text(event) if isinstance(event, UserJoined) else _departure_text(event)
    return text[len(event.name) + 1 :]


class Room:
    """One room's local members, newcomers waiting for their join, and delivery."""

    __slots__ = (
        "_counts",
        "_entering",
        "_last_key",
        "_leaving",
        "_members",
        "_out",
        "_out_first",
        "_out_messages",
        "_out_timer",
        "_pacer",
        "_pending",
        "_ready",
        "_summary",
        "_summary_timer",
        "key",
        "last_event",
        "notice_limit",
    )

    def __init__(
        self,
        key: str,
        notice_limit: int = 0,
        counts: Counts | None = None,
        batch_window: float = 0.0,
        batch_rate: float = BUSY_RATE,
    ) -> None:
        self.key = key
        #: Where deliveries and latencies are counted (the gateway's; its own when alone).
        self._counts = counts if counts is not None else Counts()
        #: Past this many local members, others' joins and leaves are summarised once per
        #: SUMMARY_PERIOD instead of announced one by one (0: always one by one).
        self.notice_limit = notice_limit
        #: Joins and leaves waiting for the next summary: phrase -> names.
        self._summary: dict[str, list[str]] = {}
        self._summary_timer: asyncio.TimerHandle | None = None
        self._members: dict[str, Member] = {}
        #: Waiting for their join event.
        self._pending: dict[str, tuple[Member, asyncio.Future[None]]] = {}
        #: Joined, with the room's traffic held until their history is written.
        self._entering: dict[str, tuple[Member, list[bytes]]] = {}
        #: Entered (history written) before their join event arrived.
        self._ready: set[str] = set()
        #: Moving on: their own leave event ends their membership.
        self._leaving: dict[str, asyncio.Future[None]] = {}
        #: Stream id of the last event delivered: replay after it, skip anything up to it.
        self.last_event: str | None = None
        self._last_key: tuple[int, int] = (-1, -1)
        #: Lines for every member waiting for the batch window (a busy room's), the chat
        #: messages among them, the first one's milliseconds, and the timer to write them.
        self._pacer = Pacer(batch_window, batch_rate)
        self._out: list[bytes] = []
        self._out_messages = 0
        self._out_first = 0
        self._out_timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Local members, newcomers included."""
        return len(self._members) + len(self._entering) + len(self._pending)

    def __contains__(self, member_id: str) -> bool:
        return (
            member_id in self._members or member_id in self._entering or member_id in self._pending
        )

    def members(self) -> list[Member]:
        return [*self._members.values(), *(m for m, _ in self._entering.values())]

    def idle(self) -> bool:
        """Nobody here, on the way in, or on the way out."""
        return not len(self) and not self._leaving

    # -- membership ----------------------------------------------------------------------

    def expect(self, member: Member) -> asyncio.Future[None]:
        """``member`` is about to join: admit it when its join event arrives. The future is
        done once it is admitted."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[member.id] = (member, future)
        return future

    def enter(self, member: Member, first: bytes) -> None:
        """The newcomer's welcome and history are ``first``: write them, then the traffic
        held since its join, and deliver live from now on."""
        if member.closed:
            return
        if first:
            member.write(first)
        entering = self._entering.pop(member.id, None)
        if entering is not None:
            for chunk in entering[1]:
                member.write(chunk)
            self._members[member.id] = member
        elif member.id in self._pending:
            self._ready.add(member.id)

    def admit(self, member: Member) -> None:
        """Admit ``member`` without its join event (the bus lost it): better late than never."""
        pending = self._pending.pop(member.id, None)
        if pending is not None:
            self._admit(member)
            if not pending[1].done():
                pending[1].set_result(None)

    def expect_leave(self, member: Member) -> asyncio.Future[None]:
        """``member`` is moving on: its own leave event ends its membership here. The
        future is done then."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leaving[member.id] = future
        return future

    def forget(self, member: Member) -> None:
        """``member`` left or failed to join: deliver nothing more to it."""
        self._members.pop(member.id, None)
        self._entering.pop(member.id, None)
        self._ready.discard(member.id)
        pending = self._pending.pop(member.id, None)
        if pending is not None and not pending[1].done():
            pending[1].cancel()
        leaving = self._leaving.pop(member.id, None)
        if leaving is not None and not leaving.done():
            leaving.set_result(None)

    def clear(self) -> None:
        """Write what is waiting, then forget every member (shutdown)."""
        self.flush()
        for member in [*self.members(), *(m for m, _ in self._pending.values())]:
            self.forget(member)
        if self._summary_timer is not None:
            self._summary_timer.cancel()
            self._summary_timer = None

    def _admit(self, member: Member) -> None:
        if member.closed:
            return
        if member.id in self._ready:
            self._ready.discard(member.id)
            self._members[member.id] = member
        else:
            self._entering[member.id] = (member, [])

    # -- delivery ------------------------------------------------------------------------

    def deliver_batch(self, events: list[RoomEvent]) -> None:
        """Fan bus events out to the local members, in order, skipping any already
        delivered. Lines for everyone are gathered and written to each member at once."""
        lines: list[bytes] = []
        messages = 0  # chat messages among ``lines``: what deliveries count
        first = 0  # the first new event's milliseconds: its latency stands for the batch's
        for event in events:
            key = stream_id_key(event.id)
            if key <= self._last_key:
                continue
            seen, self._last_key, self.last_event = self._last_key, key, event.id
            first = first or key[0]
            match event:
                case ChatRun():
                    # Whole, but for the part a replay delivered already (rare).
                    run = event if stream_id_key(event.ids[0]) > seen else event.after(seen)
                    if run is not None:
                        lines.append(run.lines)
                        messages += len(run.ids)
                case ChatMessage():
                    lines.append(event.line or chat_line(event.name, event.text))
                    messages += 1
                case Announcement():
                    lines.append(notice_line(announcement_text(event.text)))
                case UserJoined() | UserLeft() if event.session in self or (
                    event.session in self._leaving
                ):
                    # The event concerns one of ours: deliver what came before it first.
                    self._broadcast_all(lines, messages, first)
                    lines, messages, first = [], 0, 0
                    self._own_event(event)
                case UserJoined() | UserLeft():
                    if self._busy():
                        self._summarise(event)
                    else:
                        text = (
                            _arrival_text(event)
                            if isinstance(event, UserJoined)
                            else _departure_text(event)
                        )
                        lines.append(notice_line(text))
        self._broadcast_all(lines, messages, first)

    def _own_event(self, event: UserJoined | UserLeft) -> None:
        """A join or leave of a session held here."""
        # What waits came before the event: a member leaving still gets it, a newcomer not.
        self.flush()
        if isinstance(event, UserJoined):
            pending = self._pending.pop(event.session, None)
            if self._busy():
                self._summarise(event)
            else:
                self._broadcast(notice_line(_arrival_text(event)), skip=event.session)
            if pending is not None:
                self._admit(pending[0])
                if not pending[1].done():
                    pending[1].set_result(None)
            return
        if self._busy():
            self._summarise(event)
        else:
            self._broadcast(notice_line(_departure_text(event)), skip=event.session)
        leaving = self._leaving.pop(event.session, None)
        if leaving is not None:
            member = (
                self._members.get(event.session)
                or self._entering.get(event.session, (None, None))[0]
            )
            if member is not None:
                self.forget(member)
            if not leaving.done():
                leaving.set_result(None)
        # Otherwise it was announced while still connected here: this gateway was taken
        # for dead, and restores its members when it registers again.

    def _busy(self) -> bool:
        return bool(self.notice_limit) and len(self._members) > self.notice_limit

    def _summarise(self, event: UserJoined | UserLeft) -> None:
        self._summary.setdefault(_phrase(event), []).append(event.name)
        if self._summary_timer is None:
            loop = asyncio.get_running_loop()
            self._summary_timer = loop.call_later(SUMMARY_PERIOD, self._send_summary)

    def _send_summary(self) -> None:
        self._summary_timer = None
        summary, self._summary = self._summary, {}
        for phrase, names in summary.items():
            self._broadcast(notice_line(summary_text(names, phrase)))

    def notify_all(self, text: str) -> None:
        """A ``* `` line from this gateway itself to every local member."""
        self._broadcast(notice_line(text))

    def _broadcast_all(self, lines: list[bytes], messages: int = 0, first: int = 0) -> None:
        """Write ``lines`` (``messages`` of them chat messages, the first of them
        published at ``first`` milliseconds) to every member: at once, or with what
        follows once the batch window is over if the room is busy."""
        if not lines:
            return
        now = time.monotonic()
        pacer = self._pacer
        pacer.arrived(messages, now)
        self._out += lines
        self._out_messages += messages
        self._out_first = self._out_first or first
        if self._out_timer is not None:
            return  # already waiting
        due = pacer.due(now)
        if due <= now:
            self.flush()
        else:
            self._counts.batches_delayed += 1
            loop = asyncio.get_running_loop()
            self._out_timer = loop.call_later(due - now, self.flush)

    def flush(self) -> None:
        """Write the lines waiting for the batch window now (if any)."""
        if self._out_timer is not None:
            self._out_timer.cancel()
            self._out_timer = None
        if not self._out:
            return
        lines, messages, first = self._out, self._out_messages, self._out_first
        self._out, self._out_messages, self._out_first = [], 0, 0
        self._send(lines[0] if len(lines) == 1 else b"".join(lines))
        self._pacer.sent(time.monotonic())
        # Counted per batch: the members written to (or holding it for later) times
        # the messages in it, never a call per recipient.
        self._counts.deliveries += messages * (len(self._members) + len(self._entering))
        if first:
            # The batch's oldest; the stream id is Redis's clock, ours may be a little behind.
            self._counts.observe_latency(max(0.0, time.time() - first / 1000))

    def _broadcast(self, data: bytes, skip: str | None = None) -> None:
        """Write ``data`` to every member but ``skip``, after what is waiting."""
        self.flush()
        self._send(data, skip)

    def _send(self, data: bytes, skip: str | None = None) -> None:
        # write() never raises and never removes members synchronously (an abort reports
        # connection_lost on a later loop iteration), so iterating the dict is safe.
        for member_id, member in self._members.items():
            if member_id != skip:
                member.write(data)
        for member_id, (member, held) in self._entering.items():
            if member_id == skip:
                continue
            if len(held) < MAX_HELD_CHUNKS:
                held.append(data)
            else:
                member.abort()  # its history never came and the room went on: start over


class Rooms:
    """The rooms this gateway hosts (those with local members, or about to have some)."""

    def __init__(
        self,
        notice_limit: int = 0,
        counts: Counts | None = None,
        batch_window: float = 0.0,
        batch_rate: float = BUSY_RATE,
    ) -> None:
        self.notice_limit = notice_limit
        self.counts = counts if counts is not None else Counts()
        #: Seconds a busy room's lines may wait to go out together (0: never), and the
        #: messages a second above which a room is busy.
        self.batch_window = batch_window
        self.batch_rate = batch_rate
        self._rooms: dict[str, Room] = {}

    def __iter__(self) -> Iterator[Room]:
        return iter(list(self._rooms.values()))

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, key: str) -> Room | None:
        return self._rooms.get(key)

    def open(self, key: str) -> Room:
        """The room ``key``, made if this gateway did not host it yet."""
        room = self._rooms.get(key)
        if room is None:
            room = Room(key, self.notice_limit, self.counts, self.batch_window, self.batch_rate)
            self._rooms[key] = room
        return room

    def close_if_empty(self, key: str) -> bool:
        """Stop hosting ``key`` if no local member is in it or on its way; True if so."""
        room = self._rooms.get(key)
        if room is None or not room.idle():
            return False
        room.clear()
        del self._rooms[key]
        return True

    def members(self) -> int:
        return sum(len(room) for room in self._rooms.values())

    def clear(self) -> None:
        for room in self._rooms.values():
            room.clear()
        self._rooms.clear()
