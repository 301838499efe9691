"""The room as one gateway sees it: its local members, and fan-out of room events to them.

Events arrive from the bus in stream order; each is encoded once and the same bytes are
written to every local member. A member's join event is also the moment it starts
receiving: everything after the join in stream order reaches the joiner, nothing before,
on every gateway alike.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from broker import (
    Announcement,
    ChatMessage,
    RoomEvent,
    UserJoined,
    UserKicked,
    UserLeft,
    stream_id_key,
)
from gateway.protocol import announcement_text, chat_line, joined_text, left_text, notice_line

log = logging.getLogger(__name__)


#: Seconds between join/leave summaries in a busy room.
SUMMARY_PERIOD = 1.0
#: Names a summary line spells out; the rest are counted.
SUMMARY_NAMES = 5


class NoticeSummary:
    """Joins and leaves gathered for one summary.

    Announcing each join to everyone costs n writes per join, n^2 for a storm of n joins:
    a thousand people arriving at once would mean a million lines. In a busy room they are
    summarised instead, which costs each member one line per period whatever the storm.
    """

    __slots__ = ("joined", "left")

    def __init__(self) -> None:
        self.joined: list[str] = []
        self.left: list[str] = []

    def add(self, name: str, joined: bool) -> None:
        (self.joined if joined else self.left).append(name)

    def texts(self) -> list[str]:
        return [
            _summary_text(names, verb)
            for names, verb in ((self.joined, "joined"), (self.left, "left"))
            if names
        ]


def _summary_text(names: list[str], verb: str) -> str:
    if len(names) == 1:
        return f"{names[0]} {verb} the chat"
    shown = ", ".join(names[:SUMMARY_NAMES])
    more = f" and {len(names) - SUMMARY_NAMES} more" if len(names) > SUMMARY_NAMES else ""
    return f"{len(names)} users {verb} the chat: {shown}{more}"


class Member(Protocol):
    """What the room needs of a session."""

    id: str
    closed: bool

    def accept(self, online: int) -> None: ...
    def write(self, data: bytes) -> None: ...
    def kick(self, reason: str) -> None: ...


class Room:
    """Local members of the room, logins waiting for their join event, and delivery."""

    __slots__ = (
        "_last_key",
        "_members",
        "_pending",
        "_summary",
        "_summary_timer",
        "gone",
        "last_event",
        "notice_limit",
    )

    def __init__(self, notice_limit: int = 0) -> None:
        #: Past this many local members, others' joins and leaves are summarised once per
        #: SUMMARY_PERIOD instead of announced one by one (0: always one by one).
        self.notice_limit = notice_limit
        self._summary = NoticeSummary()
        self._summary_timer: asyncio.TimerHandle | None = None
        self._members: dict[str, Member] = {}
        self._pending: dict[str, tuple[Member, asyncio.Future[None]]] = {}
        #: Stream id of the last event delivered: replay after it, skip anything up to it.
        self.last_event: str | None = None
        self._last_key: tuple[int, int] = (-1, -1)
        #: Members still connected here whose leave the cluster announced (this gateway was
        #: reaped while alive): on re-registering, they are announced as joining again.
        self.gone: set[str] = set()

    def __len__(self) -> int:
        return len(self._members)

    def members(self) -> list[Member]:
        return list(self._members.values())

    def expect(self, member: Member) -> asyncio.Future[None]:
        """``member`` is claiming a name: admit it when its join event arrives. The future
        is done once it is admitted."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[member.id] = (member, future)
        return future

    def admit(self, member: Member, online: int) -> None:
        """Admit ``member`` without its join event (the bus lost it): better late than never."""
        pending = self._pending.pop(member.id, None)
        if pending is not None:
            self._admit(member, online)
            if not pending[1].done():
                pending[1].set_result(None)

    def forget(self, member: Member) -> None:
        """``member`` left or failed to log in: deliver nothing more to it."""
        self._members.pop(member.id, None)
        self.gone.discard(member.id)
        pending = self._pending.pop(member.id, None)
        if pending is not None and not pending[1].done():
            pending[1].cancel()

    def clear(self) -> None:
        """Forget every member (shutdown)."""
        for member in list(self._members.values()) + [m for m, _ in self._pending.values()]:
            self.forget(member)
        if self._summary_timer is not None:
            self._summary_timer.cancel()
            self._summary_timer = None

    def deliver(self, event: RoomEvent) -> None:
        """Fan one bus event out to the local members."""
        self.deliver_batch([event])

    def deliver_batch(self, events: list[RoomEvent]) -> None:
        """Fan bus events out to the local members, in order, skipping any already
        delivered. Lines for everyone are gathered and written to each member at once."""
        lines: list[bytes] = []
        for event in events:
            key = stream_id_key(event.id)
            if key <= self._last_key:
                continue
            self._last_key, self.last_event = key, event.id
            if isinstance(event, ChatMessage):
                lines.append(chat_line(event.name, event.text))
            elif isinstance(event, Announcement):
                lines.append(notice_line(announcement_text(event.text)))
            elif event.session in self._pending or event.session in self._members:
                # The event concerns one of ours: deliver what came before it first.
                self._broadcast_all(lines)
                lines = []
                self._own_event(event)
            elif isinstance(event, UserJoined | UserLeft):
                joined = isinstance(event, UserJoined)
                if self._busy():
                    self._summary.add(event.name, joined)
                    self._schedule_summary()
                else:
                    text = joined_text(event.name) if joined else left_text(event.name)
                    lines.append(notice_line(text))
        self._broadcast_all(lines)

    def _own_event(self, event: RoomEvent) -> None:
        """A join, leave or kick of a session held here."""
        if isinstance(event, UserJoined):
            if self._busy():
                self._summary.add(event.name, True)
                self._schedule_summary()
            else:
                self._broadcast(notice_line(joined_text(event.name)), skip=event.session)
            pending = self._pending.pop(event.session, None)
            if pending is not None:
                self._admit(pending[0], event.online)
                if not pending[1].done():
                    pending[1].set_result(None)
        elif isinstance(event, UserLeft):
            # Announced while still connected here: this gateway was taken for dead.
            self._broadcast(notice_line(left_text(event.name)), skip=event.session)
            self.gone.add(event.session)
        elif isinstance(event, UserKicked):
            member = self._members.get(event.session)
            if member is not None:
                member.kick(event.reason)

    def _busy(self) -> bool:
        return bool(self.notice_limit) and len(self._members) > self.notice_limit

    def _schedule_summary(self) -> None:
        if self._summary_timer is None:
            loop = asyncio.get_running_loop()
            self._summary_timer = loop.call_later(SUMMARY_PERIOD, self._send_summary)

    def _send_summary(self) -> None:
        self._summary_timer = None
        for text in self._summary.texts():
            self._broadcast(notice_line(text))
        self._summary = NoticeSummary()

    def notify_all(self, text: str) -> None:
        """A ``* `` line from this gateway itself to every local member."""
        self._broadcast(notice_line(text))

    def _admit(self, member: Member, online: int) -> None:
        if member.closed:
            return
        self._members[member.id] = member
        member.accept(online)

    def _broadcast_all(self, lines: list[bytes]) -> None:
        if lines:
            self._broadcast(lines[0] if len(lines) == 1 else b"".join(lines))

    def _broadcast(self, data: bytes, skip: str | None = None) -> None:
        # write() never raises and never removes members synchronously (an abort reports
        # connection_lost on a later loop iteration), so iterating the dict is safe.
        for session_id, member in self._members.items():
            if session_id != skip:
                member.write(data)
