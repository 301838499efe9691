"""The gateway: accepts clients, relays the room through the broker, keeps itself live.

Lifecycle::

    start:    bind the port -> register as live -> subscribe to the room -> accept clients
    running:  relay (bus -> local members), liveness (renew, reap dead peers), publisher
    shutdown: stop accepting -> tell clients -> publish what they sent -> announce their
              leaves and drop presence (one atomic step) -> close connections (grace
              period, then cut) -> stop background tasks -> close Redis

:meth:`Gateway.shutdown` is safe to call more than once; later calls wait for the first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import socket
import time
from collections.abc import Coroutine
from typing import Any

from broker import (
    BrokerError,
    BrokerUnavailable,
    ChatMessage,
    GatewayIdInUse,
    RedisBroker,
    RoomEvent,
    stream_id_key,
)
from gateway.config import GatewayConfig
from gateway.errors import StartupError
from gateway.health import HealthServer
from gateway.protocol import (
    MAX_HISTORY,
    NAME_LOST_TEXT,
    NO_HISTORY_TEXT,
    RESTART_TEXT,
    SERVER_FULL_TEXT,
    SERVICE_BACK_TEXT,
    SERVICE_DOWN_TEXT,
    TOO_MANY_FROM_ADDRESS_TEXT,
    UNAVAILABLE_TEXT,
    WHO_UNAVAILABLE_TEXT,
    history_text,
    name_taken_text,
    notice_line,
    who_texts,
)
from gateway.publisher import Publisher
from gateway.room import Room
from gateway.session import Session

log = logging.getLogger(__name__)

#: Seconds a login waits for its own join event on the bus before admitting the user anyway
#: (the join is in Redis; only the live notification went missing).
ADMIT_TIMEOUT = 5.0
#: Seconds the room subscription may be down before users are told: a reconnect that
#: succeeds at once (a blip, replayed from the stream) is not worth alarming anyone.
DOWN_NOTICE_DELAY = 1.0
#: Backoff bounds, seconds, for re-subscribing after the bus link broke.
RETRY_MIN, RETRY_MAX = 0.1, 5.0
#: Seconds closing connections get to flush their last lines at shutdown before being cut.
CLOSE_WAIT = 2.0
#: Seconds between cancellations of a background task that has not stopped at shutdown,
#: and how many times it is cancelled before the stop goes on without it.
CANCEL_RETRY, CANCEL_ATTEMPTS = 0.1, 50
#: Pending connections the kernel queues for us; join storms arrive in bursts.
BACKLOG = 1024


def _history_fields(message: ChatMessage) -> tuple[str, str, float]:
    return message.name, message.text, stream_id_key(message.id)[0] / 1000


class Gateway:
    """One gateway process's service. Create, then ``await run()``."""

    def __init__(self, config: GatewayConfig, broker: RedisBroker) -> None:
        self.config = config
        self.id = config.resolved_id()
        self.instance = secrets.token_hex(6)
        self.broker = broker
        self.room = Room(config.notice_limit)
        self.publisher = Publisher(broker, self.id)
        #: The Redis data set we registered in (see RedisBroker.epoch).
        self._epoch = ""
        self.address = ""
        self._sessions: set[Session] = set()
        self._per_address: dict[str, int] = {}
        self._limits = (
            (config.rate_limit, float(config.rate_burst)) if config.rate_limit > 0 else None
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._subscribed = asyncio.Event()
        self._bus_up = False
        self._down_notice: asyncio.TimerHandle | None = None
        self._told_down = False
        self._last_renewal = 0.0
        #: Name key -> Unix time of its latest message, flushed to Redis once per heartbeat.
        self._activity: dict[str, float] = {}
        self._health = HealthServer(self.health)
        self._stop = asyncio.Event()
        self._all_closed = asyncio.Event()
        self._stopping = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._started = time.time()

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve until :meth:`request_stop`, then shut down."""
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (signal handlers call this)."""
        self._stop.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._new_session,
                self.config.host,
                self.config.port,
                backlog=BACKLOG,
                reuse_address=True,
                start_serving=False,
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}"
            ) from exc
        host, port = self._server.sockets[0].getsockname()[:2]
        shown_host = socket.gethostname() if host in ("0.0.0.0", "::") else host
        self.address = f"{shown_host}:{port}"
        await self._register()
        for coro in (self.publisher.run(), self._relay(), self._liveness()):
            task = asyncio.create_task(coro)
            task.add_done_callback(self._background_done)
            self._background.append(task)
        try:
            async with asyncio.timeout(self.config.redis_wait):
                await self._subscribed.wait()
        except TimeoutError:
            raise StartupError(
                f"cannot subscribe to the room on {self.broker.description}"
            ) from None
        await self._server.start_serving()
        log.info("listening on %s:%d (%s)", host, port, self.broker.description)
        if self.config.health_port is not None:
            try:
                bound = await self._health.start(self.config.host, self.config.health_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve health on port {self.config.health_port}: {exc.strerror}"
                ) from exc
            log.info("health endpoint on %s:%d", host, bound)

    def health(self) -> tuple[bool, str]:
        """(healthy, why): live in Redis recently and subscribed to the room."""
        if self._stopping:
            return False, "stopping"
        age = asyncio.get_running_loop().time() - self._last_renewal
        if age > self.config.liveness_ttl:
            return False, f"no liveness renewal for {age:.0f}s: Redis unreachable"
        if not self._bus_up:
            return False, "room subscription down"
        return True, f"ok: {len(self.room)} user(s), {len(self._sessions)} connection(s)"

    async def shutdown(self) -> None:
        """Drain and stop; see the module docstring for the sequence."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(self._shutdown())
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self) -> None:
        self._stopping = True
        grace = self.config.shutdown_grace
        await self._health.close()
        if self._server is not None:
            self._server.close()
        sessions = list(self._sessions)
        log.info("shutting down: %d client(s) connected", len(sessions))
        self.room.clear()
        for session in sessions:
            session.stop_reading()
            session.notify([RESTART_TEXT])
        await self._settle_with_broker(grace)
        for session in sessions:
            session.close()
        if self._sessions:
            try:
                async with asyncio.timeout(CLOSE_WAIT):
                    await self._all_closed.wait()
            except TimeoutError:
                log.warning(
                    "%d client(s) did not take their last lines in %.0fs; cutting",
                    len(self._sessions),
                    CLOSE_WAIT,
                )
                for session in list(self._sessions):
                    session.abort()
        await self._cancel(self._tasks | set(self._background))
        if self._server is not None:
            await self._server.wait_closed()
        await self.broker.close()
        log.info("stopped")

    async def _settle_with_broker(self, grace: float) -> None:
        """Publish what clients sent before the stop, then announce their leaves: both
        within ``grace`` seconds, after which peers' reaping is the fallback."""
        if not self._background:
            return  # never started: nothing registered
        try:
            async with asyncio.timeout(grace):
                await self.publisher.drain()
                evicted = await self.broker.deregister_gateway(self.id, self.instance)
            log.info("deregistered; %d user(s) announced as left", evicted)
        except (BrokerError, TimeoutError) as exc:
            log.warning(
                "could not deregister (%s); peers will reap this gateway within %.0fs",
                exc or "timed out",
                self.config.liveness_ttl + self.config.heartbeat_interval,
            )

    @staticmethod
    async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
        """Cancel ``tasks`` and wait for them, cancelling again any that carried on: on
        Python 3.11 ``asyncio.wait_for`` (used inside some Redis clients, fakeredis's for
        one) drops a cancellation that arrives as its awaitable completes."""
        pending = set(tasks)
        for _ in range(CANCEL_ATTEMPTS):
            if not pending:
                return
            for task in pending:
                task.cancel()
            done, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: _background_done/_task_done logged it
        if pending:
            log.warning("%d task(s) would not stop; leaving them", len(pending))

    def _background_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("background task %s died", task.get_name(), exc_info=task.exception())
            self.request_stop()

    async def _register(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.redis_wait
        delay = RETRY_MIN
        while True:
            try:
                evicted = await self.broker.register_gateway(
                    self.id, self.instance, self.address, self._started, self.config.liveness_ttl
                )
                self._epoch = await self.broker.epoch()
                break
            except GatewayIdInUse as exc:
                # Usually our own previous run, killed a moment ago: its liveness key
                # expires within the TTL. A second live gateway with our id never does.
                if loop.time() + delay > deadline:
                    raise StartupError(str(exc)) from exc
                log.warning("%s; waiting for it to expire", exc)
            except BrokerUnavailable as exc:
                if loop.time() + delay > deadline:
                    raise StartupError(f"cannot reach {self.broker.description}: {exc}") from exc
                log.warning("waiting for %s: %s", self.broker.description, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        self._last_renewal = loop.time()
        if evicted:
            log.info("%d user(s) left over from an earlier run announced as left", evicted)
        log.info("registered as live (instance %s)", self.instance)

    # -- background tasks ----------------------------------------------------------------

    async def _relay(self) -> None:
        """Bus -> local members, re-subscribing (and replaying the gap) when the link breaks."""
        delay = RETRY_MIN
        while True:
            try:
                async with self.broker.subscribe_batches() as batches:
                    await self._catch_up()
                    if self._subscribed.is_set():
                        log.info("room subscription restored")
                    self._subscribed.set()
                    self._service_up()
                    delay = RETRY_MIN
                    async for batch in batches:
                        self._deliver(batch)
            except BrokerUnavailable as exc:
                log.warning("room subscription lost (%s); retrying in %.1fs", exc, delay)
            self._service_down()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    def _service_down(self) -> None:
        self._bus_up = False
        if self._down_notice is None and not self._told_down:
            self._down_notice = asyncio.get_running_loop().call_later(
                DOWN_NOTICE_DELAY, self._tell_down
            )

    def _tell_down(self) -> None:
        self._down_notice = None
        if not self._bus_up and not self._stopping:
            self._told_down = True
            self.room.notify_all(SERVICE_DOWN_TEXT)

    def _service_up(self) -> None:
        self._bus_up = True
        if self._down_notice is not None:
            self._down_notice.cancel()
            self._down_notice = None
        if self._told_down:
            self._told_down = False
            self.room.notify_all(SERVICE_BACK_TEXT)

    async def _catch_up(self) -> None:
        if self.room.last_event is None:
            return
        missed = await self.broker.events_after(self.room.last_event)
        if missed:
            log.info("replaying %d room event(s) missed while unsubscribed", len(missed))
        self._deliver(missed)

    def _deliver(self, events: list[RoomEvent]) -> None:
        try:
            self.room.deliver_batch(events)
        except Exception:
            log.exception("unexpected error delivering %d event(s)", len(events))

    async def _liveness(self) -> None:
        """Renew this gateway's liveness; reap peers whose liveness expired."""
        ttl = self.config.liveness_ttl
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                if not await self.broker.heartbeat(self.id, self.instance, ttl):
                    await self._recover_registration()
                self._last_renewal = asyncio.get_running_loop().time()
                for gateway, users in (await self.broker.reap_dead_gateways()).items():
                    log.info(
                        "gateway %s stopped renewing its liveness: reaped, %d user(s) "
                        "announced as left",
                        gateway,
                        users,
                    )
                self.publisher.retry_releases()
                activity, self._activity = self._activity, {}
                await self.broker.touch(activity)
            except BrokerUnavailable as exc:
                log.warning("liveness renewal failed: %s", exc)
            except GatewayIdInUse as exc:
                log.error("%s; stopping", exc)
                self.request_stop()
                return

    async def _recover_registration(self) -> None:
        """Our registration vanished (we were reaped, or Redis lost its data): register
        again and restore our users' presence in one atomic step; users whose name was
        taken meanwhile are disconnected."""
        log.warning("registration lost; registering again and restoring %d user(s)", len(self.room))
        # Releases already queued run first, while we are unregistered: those whose user
        # Redis forgot wait, undecided, for the verdict below.
        await self.publisher.drain()
        epoch = await self.broker.epoch()
        lost_data = epoch != self._epoch
        now = time.time()
        users = [s for s in self._sessions if s.joined and not s.closed]
        entries = [
            (s.key, s.name, s.id, now, s.id in self.room.gone)
            for s in users
            if s.key is not None and s.name is not None
        ]
        # Users whose leave was announced (we were reaped) are announced again; users
        # Redis merely forgot (it restarted empty) never left anyone's view: restored
        # silently.
        refused = set(
            await self.broker.restore_gateway(
                self.id, self.instance, self.address, self._started, self.config.liveness_ttl,
                entries,
            )
        )  # fmt: skip
        # Only now: if this attempt failed, the next one must reach the same verdict.
        self._epoch = epoch
        self.room.gone.clear()
        for session in users:
            if session.key in refused:
                session.joined = False
                session.error(NAME_LOST_TEXT)
                session.close()
        if lost_data:
            # Users who left while Redis was away were never announced: their presence
            # went with Redis's data, so no release could find it.
            owed = self.publisher.force_pending_releases()
            log.info("Redis lost its data: announcing %d leave(s) from the outage", owed)
            await self.publisher.drain()  # failures among them go with the next retry

    # -- hub: what sessions ask of the gateway -------------------------------------------

    def _new_session(self) -> Session:
        return Session(self, f"{self.instance}-{next(self._ids)}", self._limits)

    def session_started(self, session: Session) -> None:
        config = self.config
        address = session.address
        if config.max_clients and len(self._sessions) >= config.max_clients:
            log.warning("refused %s: %d connections already", session.peer, len(self._sessions))
            session.refuse(SERVER_FULL_TEXT)
            return
        from_address = self._per_address.get(address, 0)
        if config.max_per_address and from_address >= config.max_per_address:
            log.warning("refused %s: %d connections from that address", session.peer, from_address)
            session.refuse(TOO_MANY_FROM_ADDRESS_TEXT)
            return
        self._per_address[address] = from_address + 1
        self._sessions.add(session)
        session.set_keepalive(
            config.keepalive_idle, config.keepalive_interval, config.keepalive_count
        )
        log.info("connection %s from %s", session.id, session.peer)

    def session_ended(self, session: Session) -> None:
        if session not in self._sessions:
            return  # refused at the door: never counted
        self._sessions.discard(session)
        address = session.address
        if (left := self._per_address.get(address, 1) - 1) > 0:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)
        self.room.forget(session)
        if session.joined and session.key is not None and not self._stopping:
            self.publisher.release(session.id, session.key, session.name or session.key)
        log.info("connection %s closed (%s)", session.id, session.name or "no name")
        if self._stopping and not self._sessions:
            self._all_closed.set()

    def login(self, session: Session, name: str, key: str) -> None:
        self._spawn(self._login(session, name, key))

    def publish(self, session: Session, text: str) -> None:
        assert session.name is not None and session.key is not None
        self.publisher.message(session, session.name, text)
        self._activity[session.key] = time.time()

    def who(self, session: Session) -> None:
        self._spawn(self._who(session))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("unexpected error in %s", task.get_name(), exc_info=task.exception())

    async def _login(self, session: Session, name: str, key: str) -> None:
        # The join event may admit the session before the claim's reply reaches us, and
        # an admitted session may publish at once: its key must be known from the start.
        session.key = key
        admitted = self.room.expect(session)
        if self.config.history:
            session.expect_history()
        try:
            await self._claim_and_admit(session, name, key, admitted)
        finally:
            session.history_ready(b"")  # no-op unless the history never came

    async def _claim_and_admit(
        self, session: Session, name: str, key: str, admitted: asyncio.Future[None]
    ) -> None:
        online, join_id = 0, None
        try:
            claim = await self.broker.claim(
                key, name, self.id, self.instance, session.id, time.time()
            )
            accepted, online, join_id = claim.accepted, claim.online, claim.event_id
        except BrokerUnavailable as exc:
            # The claim may have gone through with only its reply lost: if its join event
            # admitted the session, it did; otherwise give back whatever it may hold.
            accepted = admitted.done() and not admitted.cancelled()
            if not accepted:
                log.warning("cannot log %s in: %s", name, exc)
                self.publisher.release(session.id, key, name, owed=False)
                self._refuse(session, UNAVAILABLE_TEXT)
                return
        if not accepted:
            self._refuse(session, name_taken_text(name))
            return
        session.joined = True
        log.info("connection %s joined as %s", session.id, name)
        if session.closed:  # it hung up while we claimed: give the name back
            self.room.forget(session)
            self.publisher.release(session.id, key, name)
            return
        if self.config.history:
            session.history_ready(await self._history_lines(self.config.history, join_id))
        done, _ = await asyncio.wait({admitted}, timeout=ADMIT_TIMEOUT)
        if not done:
            log.warning(
                "join event for %s not seen in %.0fs; admitting anyway", name, ADMIT_TIMEOUT
            )
            self.room.admit(session, online)

    def _refuse(self, session: Session, reason: str) -> None:
        session.key = None
        self.room.forget(session)
        session.reject(reason)

    async def _history_lines(self, count: int, before: str | None) -> bytes:
        """The last ``count`` messages (before stream id ``before``), as history lines;
        empty if there are none or Redis cannot say."""
        try:
            messages = await self.broker.history(count, before)
        except BrokerUnavailable as exc:
            log.warning("cannot read history: %s", exc)
            return b""
        return b"".join(notice_line(history_text(*_history_fields(m))) for m in messages)

    def history(self, session: Session, count: int | None) -> None:
        self._spawn(self._send_history(session, count or self.config.history or MAX_HISTORY))

    async def _send_history(self, session: Session, count: int) -> None:
        data = await self._history_lines(count, None)
        if data:
            session.write(data)
        else:
            session.notify([NO_HISTORY_TEXT])

    async def _who(self, session: Session) -> None:
        try:
            users = await self.broker.online()
        except BrokerUnavailable as exc:
            log.warning("cannot list users: %s", exc)
            session.error(WHO_UNAVAILABLE_TEXT)
            return
        session.notify(who_texts(user.name for user in users))
