"""Keeping a gateway live in the cluster, and the cluster clear of dead gateways.

Every heartbeat renews this gateway's liveness key and reaps peers whose key expired
(their users' leaves announced once, in their rooms). When this gateway's own
registration is found gone (it was reaped while alive, or Redis restarted empty), it
registers again and restores its users, their names and their rooms.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from broker import BrokerUnavailable, GatewayIdInUse, Member
from broker.events import encode_join
from chatwire.texts import NAME_LOST_TEXT

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)


class Liveness:
    """The heartbeat task of one gateway, and its recovery."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        #: The Redis data set we registered in (see RedisBroker.epoch).
        self.epoch = ""
        #: Event-loop time of the last successful renewal.
        self.last_renewal = 0.0
        #: Name key -> Unix time of its latest message, flushed to Redis once per heartbeat.
        self.activity: dict[str, float] = {}
        #: What the last recovery found: Redis had lost its data.
        self._lost_data = False
        #: A recovery began and did not finish (Redis failed again half-way): the next
        #: heartbeat may succeed, since the registration was restored first, but the rooms
        #: and the owed leaves still need the rest of it.
        self._unfinished = False

    async def run(self) -> None:
        """Renew this gateway's liveness; reap peers whose liveness expired."""
        while True:
            await asyncio.sleep(self._gateway.config.heartbeat_interval)
            if not await self.beat():
                return

    async def beat(self) -> bool:
        """One heartbeat: renew (or recover), reap dead peers, retry failed releases, flush
        activity. False once another instance has taken this gateway's id (it stops)."""
        gw = self._gateway
        broker, config = gw.broker, gw.config
        try:
            renewed = await broker.heartbeat(gw.id, gw.instance, config.liveness_ttl)
            if not renewed or self._unfinished:
                await self.recover()
            self.last_renewal = asyncio.get_running_loop().time()
            for gateway, users in (await broker.reap_dead_gateways()).items():
                log.info(
                    "gateway %s stopped renewing its liveness: reaped, %d user(s) "
                    "announced as left",
                    gateway,
                    users,
                )
            gw.publisher.retry_releases()
            activity, self.activity = self.activity, {}
            await broker.touch(activity)
        except BrokerUnavailable as exc:
            gw.counts.redis_errors += 1
            log.warning("liveness renewal failed: %s", exc)
        except GatewayIdInUse as exc:
            log.error("%s; stopping", exc)
            gw.request_stop()
            return False
        return True

    async def recover(self) -> None:
        """Our registration vanished (we were reaped, or Redis lost its data): register
        again and restore our users' presence and rooms; users whose name was taken
        meanwhile are disconnected.

        It runs in the publisher's worker: the releases queued before it run first, while
        we are unregistered (those whose user Redis forgot wait, undecided, for its
        verdict), and none can run between its steps and find a user half restored."""
        await self._gateway.publisher.exclusive(self._restore)
        if self._lost_data:
            # Users who left while Redis was away were never announced: their presence
            # went with Redis's data, so no release could find it.
            owed = self._gateway.publisher.force_pending_releases()
            log.info("Redis lost its data: announcing %d leave(s) from the outage", owed)
            await self._gateway.publisher.drain()  # failures among them go with the next retry

    async def _restore(self) -> None:
        gw = self._gateway
        broker = gw.broker
        self._unfinished = True
        users = [s for s in gw.sessions() if s.joined and not s.closed]
        log.warning("registration lost; registering again and restoring %d user(s)", len(users))
        epoch = await broker.epoch()
        lost_data = epoch != self.epoch
        now = time.time()
        entries = [(s.key, s.name, s.id, now, s.room_key) for s in users if s.key and s.name]
        # Users gone from here whose release waits behind this recovery: if Redis lost its
        # data they are restored too (silently), so that their release finds them and
        # announces their leave; left out, it would find nobody and announce nothing.
        queued = gw.publisher.queued_releases() if lost_data else []
        entries += [(key, name, sid, now, room) for sid, key, name, room in queued]
        refused = set(
            await broker.restore_gateway(
                gw.id, gw.instance, gw.address, gw.started, gw.config.liveness_ttl, entries
            )
        )
        # Users whose leave was announced (we were reaped) are announced again; users Redis
        # merely forgot (it restarted empty) never left anyone's view: restored silently.
        by_room: dict[str, list[Member]] = defaultdict(list)
        shown: dict[str, str] = {}
        for s in users:
            if s.key in refused or s.name is None:
                continue
            join = "" if lost_data else encode_join(s.name, gw.id, s.id)
            by_room[s.room_key].append(Member(s.id, s.name, gw.id, join))
            shown[s.room_key] = s.room
        for sid, key, name, room in queued:
            if key not in refused:
                by_room[room].append(Member(sid, name, gw.id, ""))
                shown.setdefault(room, room)
        for room, members in by_room.items():
            await broker.enter(room, shown[room], members)
        # Only now: if this attempt failed, the next one must reach the same verdict.
        self.epoch = epoch
        self._lost_data = lost_data
        self._unfinished = False
        for session in users:
            if session.key in refused:
                session.joined = False
                session.error(NAME_LOST_TEXT, None)  # no line of theirs refused
                session.close()
