"""What the gateway does for each command a user sends: one handler per request of the
command table (:mod:`chatwire.commands`), dispatched exhaustively.

Handlers run as tasks of their own; each answers its user alone, and turns a Redis failure
into a ``! `` line for that user.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import TYPE_CHECKING, assert_never

from broker import BrokerUnavailable, Member
from broker.events import encode_join, encode_leave
from chatwire.commands import Help, History, Join, PrivateMessage, Quit, Request, Rooms, Who
from chatwire.names import DEFAULT_ROOM_KEY
from chatwire.texts import (
    MAX_HISTORY,
    MOVE_UNAVAILABLE_TEXT,
    NO_HISTORY_TEXT,
    NOT_DELIVERED_TEXT,
    ROOMS_UNAVAILABLE_TEXT,
    WHO_UNAVAILABLE_TEXT,
    not_online_text,
    private_echo_line,
    rooms_texts,
    who_texts,
)
from gateway.metrics import Refusal
from gateway.session import Session

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)

#: Seconds a newcomer waits for its own join event on the bus before being admitted
#: anyway (the join is in Redis; only the live notification went missing), and a mover
#: for its own leave event in the room it left.
ADMIT_TIMEOUT = 5.0


class Commands:
    """The command handlers of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    def handle(self, session: Session, request: Request) -> None:
        """Serve ``request`` for ``session`` (in a task of its own where it needs Redis)."""
        spawn = self._gw.spawn
        match request:
            case Who():
                spawn(self._who(session))
            case Rooms():
                spawn(self._rooms(session))
            case History(count=count):
                config = self._gw.config
                spawn(self._history(session, count or config.history or MAX_HISTORY))
            case Join():
                spawn(self._gw.moves.move(session, request))
            case PrivateMessage():
                spawn(self._private(session, request))
            case Help() | Quit():
                pass  # answered by the protocol itself
            case _:
                assert_never(request)

    async def _who(self, session: Session) -> None:
        broker = self._gw.broker
        try:
            names = await broker.members(session.room_key)
            everyone = (
                session.room_key == DEFAULT_ROOM_KEY and len(names) == await broker.online_count()
            )
        except BrokerUnavailable as exc:
            log.warning("cannot list users: %s", exc)
            self._gw.counts.redis_errors += 1
            session.error(WHO_UNAVAILABLE_TEXT, Refusal.UNAVAILABLE)
            return
        session.notify(who_texts(names, None if everyone else session.room))

    async def _rooms(self, session: Session) -> None:
        try:
            rooms = await self._gw.broker.rooms()
        except BrokerUnavailable as exc:
            log.warning("cannot list rooms: %s", exc)
            self._gw.counts.redis_errors += 1
            session.error(ROOMS_UNAVAILABLE_TEXT, Refusal.UNAVAILABLE)
            return
        session.notify(rooms_texts(rooms))

    async def _history(self, session: Session, count: int) -> None:
        data = await self._gw.history_lines(session.room_key, count, None)
        if data:
            session.write(data)
        else:
            session.notify([NO_HISTORY_TEXT])

    async def _private(self, session: Session, request: PrivateMessage) -> None:
        sender = session.name
        assert sender is not None
        try:
            recipient = await self._gw.broker.send_private(request.key, sender, request.text)
        except BrokerUnavailable as exc:
            log.warning("cannot deliver a private message: %s", exc)
            self._gw.counts.redis_errors += 1
            session.error(NOT_DELIVERED_TEXT, Refusal.UNAVAILABLE)
            return
        if recipient is None:
            session.error(not_online_text(request.name), Refusal.NOT_ONLINE)
        else:
            session.write(private_echo_line(recipient, sender, request.text))


class Moves:
    """Moving users between rooms: announced once in each room, on every gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        #: Sessions moving, and where each is moving to (its latest move: a move resumes
        #: the user's input before its own end, so the next may already have begun).
        self._moving: dict[Session, Join] = {}

    def target(self, session: Session) -> tuple[str, ...]:
        """The room ``session`` is moving to, if it is moving."""
        request = self._moving.get(session)
        return () if request is None else (request.key,)

    async def move(self, session: Session, request: Join) -> None:
        self._moving[session] = request
        try:
            await self._move(session, request)
        finally:
            if self._moving.get(session) is request:
                del self._moving[session]

    async def _move(self, session: Session, request: Join) -> None:
        gw = self._gw
        broker, relay = gw.broker, gw.relay
        name, key, old = session.name, session.key, session.room_key
        assert name is not None and key is not None
        # The lines the user sent before /join are published in the room they were typed in.
        await gw.publisher.barrier()
        if session.closed:
            return
        try:
            room, admitted = await relay.host(request.key, session)
        except BrokerUnavailable as exc:
            gw.counts.redis_errors += 1
            log.warning("cannot move %s: %s", name, exc)
            session.move_failed(MOVE_UNAVAILABLE_TEXT)
            return
        try:
            shown = await broker.room_name(request.key) or request.room
            # Presence first: whoever evicts this user (a reaper, if we die mid-way) then
            # looks in both rooms.
            await broker.set_room(key, session.id, request.key)
            entered = await broker.enter(
                request.key, shown,
                [Member(session.id, name, gw.id, encode_join(name, gw.id, session.id, shown))],
            )  # fmt: skip
        except BrokerUnavailable as exc:
            gw.counts.redis_errors += 1
            log.warning("cannot move %s to %s: %s", name, request.key, exc)
            room.forget(session)
            relay.release(request.key)
            session.move_failed(MOVE_UNAVAILABLE_TEXT)
            with suppress(BrokerUnavailable):  # presence back to the room it is still in
                await broker.set_room(key, session.id, old)
            return
        shown, join_id = entered.room, entered.join_ids[0] or None
        if session.closed:  # it hung up meanwhile, maybe before it entered: leave again
            room.forget(session)
            relay.release(request.key)
            gw.publisher.release(session.id, key, name, (request.key,))
            return
        await self._leave(session, name, old, shown)
        history = await gw.history_lines(request.key, gw.config.history, join_id)
        if session.closed:  # its release covered both rooms
            room.forget(session)
            relay.release(request.key)
            return
        session.moved(shown, request.key, entered.members)
        room.enter(session, history)
        session.resume()
        log.info("%s moved from %s to %s", name, old, request.key)
        done, _ = await asyncio.wait({admitted}, timeout=ADMIT_TIMEOUT)
        if not done:
            log.warning("join of %s to %s not seen in %.0fs; admitting anyway", name,
                        request.key, ADMIT_TIMEOUT)  # fmt: skip
            room.admit(session)

    async def _leave(self, session: Session, name: str, old: str, to: str) -> None:
        """Leave room ``old`` for ``to``: the room sees it, and the mover sees the room up
        to that moment."""
        gw = self._gw
        previous = gw.rooms.get(old)
        left = previous.expect_leave(session) if previous is not None else None
        announced = False
        try:
            leave = encode_leave(name, gw.id, session.id, to)
            announced = any(await gw.broker.leave(old, [(session.id, leave)]))
        except BrokerUnavailable as exc:
            gw.counts.redis_errors += 1
            # The user is in the new room; the old one still lists it until its
            # eviction (presence names both rooms), which is the best we can do now.
            log.warning("cannot announce %s leaving %s: %s", name, old, exc)
        if previous is not None and left is not None:
            if announced:  # its leave event ends the mover's view of the room
                try:
                    async with asyncio.timeout(ADMIT_TIMEOUT):
                        await left
                except TimeoutError:
                    log.warning("leave of %s from %s not seen in %.0fs", name, old,
                                ADMIT_TIMEOUT)  # fmt: skip
            previous.forget(session)
        gw.relay.release(old)
