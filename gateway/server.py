"""The gateway: accepts clients, logs them in, and ties its parts together.

Lifecycle::

    start:    bind the port (and the TLS port) -> register as live -> subscribe to the
              bus -> accept clients
    running:  relay (bus -> local rooms), liveness (renew, reap dead peers), publisher,
              command handlers
    shutdown: stop accepting (on every port) -> tell clients -> stop command handlers ->
              publish what clients sent -> announce their leaves and drop presence -> close
              connections (grace period, then cut) -> stop background tasks -> close Redis

Each concern has its module: :mod:`gateway.relay` (the bus), :mod:`gateway.rooms` (fan-out),
:mod:`gateway.liveness` (heartbeat, reaping, recovery), :mod:`gateway.commands` (commands
and moves), :mod:`gateway.publisher` (outgoing traffic), :mod:`gateway.web` (the web page,
and WebSocket clients, which become sessions like TCP ones). :meth:`Gateway.shutdown` is
safe to call more than once; later calls wait for the first.

With ``--tls-port`` a second listener serves the same protocol over TLS
(:mod:`gateway.tls`): the same :class:`Session` behind the handshake, the same rooms,
limits and drain; a TLS client is one more connection like any other. With a certificate,
the web port serves HTTPS and WSS, with the same certificate, reloaded with it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from broker import (
    BrokerError,
    BrokerUnavailable,
    GatewayIdInUse,
    InboxEvent,
    Member,
    PrivateDelivery,
    RedisBroker,
    UserKicked,
    stream_id_key,
)
from broker.events import encode_join
from chatwire.commands import Request
from chatwire.names import DEFAULT_ROOM, DEFAULT_ROOM_KEY
from chatwire.texts import (
    RESTART_TEXT,
    SERVER_FULL_TEXT,
    SERVICE_BACK_TEXT,
    SERVICE_DOWN_TEXT,
    TOO_MANY_FROM_ADDRESS_TEXT,
    UNAVAILABLE_TEXT,
    history_text,
    name_taken_text,
    notice_line,
    private_line,
)
from gateway.commands import ADMIT_TIMEOUT, Commands, Moves
from gateway.config import GatewayConfig
from gateway.errors import StartupError
from gateway.health import HealthServer
from gateway.liveness import Liveness
from gateway.metrics import Counts, GatewayMetrics, Refusal, Snapshot
from gateway.publisher import Publisher
from gateway.relay import RETRY_MAX, RETRY_MIN, Relay
from gateway.rooms import Rooms
from gateway.session import Session
from gateway.tls import HANDSHAKE_TIMEOUT, SHUTDOWN_TIMEOUT, ServerTls, server_tls
from gateway.web import WebServer
from gateway.web.transport import WebSocketTransport

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

log = logging.getLogger(__name__)

#: Seconds closing connections get to flush their last lines at shutdown before being cut.
CLOSE_WAIT = 2.0
#: Seconds between cancellations of a background task that has not stopped at shutdown,
#: and how many times it is cancelled before the stop goes on without it.
CANCEL_RETRY, CANCEL_ATTEMPTS = 0.1, 50
#: Pending connections the kernel queues for us; join storms arrive in bursts.
BACKLOG = 1024


class Gateway:
    """One gateway process's service. Create, then ``await run()``."""

    def __init__(
        self, config: GatewayConfig, broker: RedisBroker, tls: ServerTls | None = None
    ) -> None:
        """``tls``: the certificate for ``config.tls_port`` and the web port's HTTPS,
        loaded already (by the CLI, to fail before waiting for Redis); loaded at start from
        ``config`` when not given."""
        self.config = config
        self.id = config.resolved_id()
        self.instance = secrets.token_hex(6)
        self.broker = broker
        #: Tallies for GET /metrics, counted where they happen (gateway/metrics.py).
        self.counts = Counts()
        self.metrics = GatewayMetrics(self.id, self.snapshot, self.counts)
        self.rooms = Rooms(config.notice_limit, self.counts, config.batch_window, config.batch_rate)
        self.publisher = Publisher(
            broker, self.id, self.counts, config.batch_window, config.batch_rate
        )
        self.relay = Relay(broker, self.id, self.rooms, self._inbox, self._service, self.counts)
        self.liveness = Liveness(self)
        self.commands = Commands(self)
        self.moves = Moves(self)
        self.address = ""
        self.started = time.time()
        self._sessions: set[Session] = set()
        #: Logged-in sessions by folded name: where private messages and kicks go.
        self._by_key: dict[str, Session] = {}
        self._per_address: dict[str, int] = {}
        self._limits = (
            (config.rate_limit, float(config.rate_burst)) if config.rate_limit > 0 else None
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self.tls = tls
        #: The TLS port bound (the configured one, or the one picked for port 0); 0: none.
        self.tls_port = 0
        #: The health port bound (GET /health, /stats, /metrics); 0: none.
        self.health_port = 0
        self._server: asyncio.Server | None = None
        self._tls_server: asyncio.Server | None = None
        self._health = HealthServer(self.health, self.stats, self.metrics.exposition)
        self._web: WebServer | None = None
        #: Sessions that came in over WebSocket (for /stats; they are in _sessions too).
        self._web_sessions: set[Session] = set()
        self._stop = asyncio.Event()
        self._all_closed = asyncio.Event()
        self._stopping = False
        self._shutdown_task: asyncio.Task[None] | None = None

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
        self._server = await self._listen(self.config.port)
        self.tls = self.tls or server_tls(self.config)
        if self.config.tls_port is not None:
            assert self.tls is not None, "config.tls_problem() should have said why"
            self._tls_server = await self._listen(self.config.tls_port, self.tls.context)
        host, port = self._server.sockets[0].getsockname()[:2]
        shown_host = socket.gethostname() if host in ("0.0.0.0", "::") else host
        self.address = f"{shown_host}:{port}"
        await self._register()
        for coro in (self.publisher.run(), self.relay.run(), self.liveness.run()):
            task = asyncio.create_task(coro)
            task.add_done_callback(self._background_done)
            self._background.append(task)
        try:
            async with asyncio.timeout(self.config.redis_wait):
                await self.relay.subscribed.wait()
        except TimeoutError:
            raise StartupError(
                f"cannot subscribe to the bus on {self.broker.description}"
            ) from None
        await self._server.start_serving()
        log.info("listening on %s:%d (%s)", host, port, self.broker.description)
        if self._tls_server is not None:
            await self._tls_server.start_serving()
            self.tls_port = self._tls_server.sockets[0].getsockname()[1]
            log.info("listening for TLS on %s:%d", host, self.tls_port)
        if self.config.web_port is not None:
            web_ssl = self.tls.context if self.tls is not None else None
            self._web = WebServer(self._web_client)
            try:
                bound = await self._web.start(self.config.host, self.config.web_port, web_ssl)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve the web page on port {self.config.web_port}: "
                    f"{exc.strerror or exc}"
                ) from exc
            scheme = "https" if web_ssl is not None else "http"
            log.info("web page and WebSocket on %s:%d (%s)", host, bound, scheme)
        if self.config.health_port is not None:
            try:
                bound = await self._health.start(self.config.host, self.config.health_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve health on port {self.config.health_port}: {exc.strerror}"
                ) from exc
            self.health_port = bound
            log.info("health endpoint on %s:%d", host, bound)

    async def _listen(self, port: int, tls: ssl.SSLContext | None = None) -> asyncio.Server:
        """Bind ``port`` for clients (over TLS with ``tls``), not accepting yet."""
        loop = asyncio.get_running_loop()
        tls_options: dict[str, Any] = {}
        if tls is not None:  # (the TLS timeouts are refused without a context)
            tls_options = {
                "ssl": tls,
                "ssl_handshake_timeout": HANDSHAKE_TIMEOUT,
                "ssl_shutdown_timeout": SHUTDOWN_TIMEOUT,
            }
        try:
            return await loop.create_server(
                self._new_session,
                self.config.host,
                port,
                backlog=BACKLOG,
                reuse_address=True,
                start_serving=False,
                **tls_options,
            )
        except OSError as exc:
            what = " for TLS" if tls is not None else ""
            raise StartupError(
                f"cannot listen{what} on {self.config.host}:{port}: {exc.strerror or exc}"
            ) from exc

    def health(self) -> tuple[bool, str]:
        """(healthy, why): live in Redis recently and subscribed to the bus."""
        if self._stopping:
            return False, "stopping"
        age = asyncio.get_running_loop().time() - self.liveness.last_renewal
        if age > self.config.liveness_ttl:
            return False, f"no liveness renewal for {age:.0f}s: Redis unreachable"
        if not self.relay.up:
            return False, "bus subscription down"
        return True, (
            f"ok: {len(self._by_key)} user(s), {len(self._sessions)} connection(s), "
            f"{len(self.rooms)} room(s)"
        )

    def stats(self) -> dict[str, int]:
        """Counters for ``GET /stats``."""
        return {
            "users": len(self._by_key),
            "connections": len(self._sessions),
            "web_connections": sum(1 for s in self._web_sessions if s in self._sessions),
            "rooms": len(self.rooms),
            "bus_messages": self.relay.received,
        }

    def snapshot(self) -> Snapshot:
        """The gauges of ``GET /metrics``, read when it is scraped."""
        return Snapshot(
            connected_clients=len(self._sessions),
            logged_in_users=len(self._by_key),
            rooms_hosted=len(self.rooms),
            heartbeat_age=asyncio.get_running_loop().time() - self.liveness.last_renewal,
        )

    async def shutdown(self) -> None:
        """Drain and stop; see the module docstring for the sequence."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(self._shutdown())
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self) -> None:
        self._stopping = True
        grace = self.config.shutdown_grace
        await self._health.close()
        for server in (self._server, self._tls_server):
            if server is not None:
                server.close()
        if self._web is not None:
            self._web.close()
        sessions = list(self._sessions)
        log.info("shutting down: %d client(s) connected", len(sessions))
        for session in sessions:
            session.stop_reading()
            session.notify([RESTART_TEXT])
        # Moves and logins under way stop first, so that nobody enters a room after the
        # eviction below (which looks wherever presence says a user is or was going).
        await self._cancel(set(self._tasks))
        self.rooms.clear()
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
        for server in (self._server, self._tls_server):
            if server is not None:
                await server.wait_closed()
        if self._web is not None:
            # Every session is closed by now; what may remain is a WebSocket handshake
            # under way (its own timeout is longer than a drain should take).
            try:
                async with asyncio.timeout(CLOSE_WAIT):
                    await self._web.wait_closed()
            except TimeoutError:
                log.warning("web connections still opening after %.0fs; leaving them", CLOSE_WAIT)
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
                    self.id, self.instance, self.address, self.started, self.config.liveness_ttl
                )
                self.liveness.epoch = await self.broker.epoch()
                break
            except GatewayIdInUse as exc:
                # Usually our own previous run, killed a moment ago: its liveness key
                # expires within the TTL. A second live gateway with our id never does.
                if loop.time() + delay > deadline:
                    raise StartupError(str(exc)) from exc
                log.warning("%s; waiting for it to expire", exc)
            except BrokerUnavailable as exc:
                self.counts.redis_errors += 1
                if loop.time() + delay > deadline:
                    raise StartupError(f"cannot reach {self.broker.description}: {exc}") from exc
                log.warning("waiting for %s: %s", self.broker.description, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        self.liveness.last_renewal = loop.time()
        if evicted:
            log.info("%d user(s) left over from an earlier run announced as left", evicted)
        log.info("registered as live (instance %s)", self.instance)

    # -- what the relay brings -----------------------------------------------------------

    def _inbox(self, event: InboxEvent) -> None:
        session = self._by_key.get(event.key)
        if session is None:
            return  # gone meanwhile
        match event:
            case PrivateDelivery():
                session.write(private_line(event.sender, event.text))
            case UserKicked():
                session.kick(event.reason)

    def _service(self, up: bool) -> None:
        if self._stopping:
            return
        text = SERVICE_BACK_TEXT if up else SERVICE_DOWN_TEXT
        for session in self._by_key.values():
            session.notify([text])

    # -- sessions ------------------------------------------------------------------------

    def sessions(self) -> list[Session]:
        return list(self._sessions)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task that the gateway keeps track of (and stops at shutdown)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("unexpected error in %s", task.get_name(), exc_info=task.exception())

    def _new_session(self) -> Session:
        return Session(self, f"{self.instance}-{next(self._ids)}", self._limits, self.counts)

    async def _web_client(self, conn: ServerConnection) -> None:
        """One WebSocket client: a session like any other, over a WebSocket transport."""
        session = self._new_session()
        self._web_sessions.add(session)
        try:
            await WebSocketTransport(conn).serve(session)
        finally:
            self._web_sessions.discard(session)

    def session_started(self, session: Session) -> None:
        config = self.config
        address = session.address
        if self._stopping:
            # A TLS handshake under way when the listeners closed finishes after the
            # clients were told: this one is told too, and not counted.
            session.refuse(RESTART_TEXT, notice=True)
            return
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
        over = " over TLS" if session.tls else ""
        log.info("connection %s from %s%s", session.id, session.peer, over)

    def session_ended(self, session: Session) -> None:
        if session not in self._sessions:
            return  # refused at the door: never counted
        self._sessions.discard(session)
        address = session.address
        if (left := self._per_address.get(address, 1) - 1) > 0:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)
        if session.key is not None and self._by_key.get(session.key) is session:
            del self._by_key[session.key]
        # Its room, and the one it was moving to if a move was under way.
        rooms = tuple(dict.fromkeys((session.room_key, *self.moves.target(session))))
        for key in rooms:
            room = self.rooms.get(key)
            if room is not None:
                room.forget(session)
                self.relay.release(key)
        if session.joined and session.key is not None and not self._stopping:
            self.publisher.release(session.id, session.key, session.name or session.key, rooms)
        log.info("connection %s closed (%s)", session.id, session.name or "no name")
        if self._stopping and not self._sessions:
            self._all_closed.set()

    def publish(self, session: Session, text: str) -> None:
        assert session.name is not None and session.key is not None
        self.counts.messages_received += 1
        self.publisher.message(session, session.room_key, session.name, text)
        self.liveness.activity[session.key] = time.time()

    def command(self, session: Session, request: Request) -> None:
        self.commands.handle(session, request)

    def hold_input(self, session: Session) -> bool:
        return self.publisher.hold(session)

    # -- login ---------------------------------------------------------------------------

    def login(self, session: Session, name: str, key: str) -> None:
        started = asyncio.get_running_loop().time()
        self.spawn(self._login(session, name, key, started))

    async def _login(self, session: Session, name: str, key: str, started: float) -> None:
        """Claim ``name`` for ``session`` and bring it into the default room; ``started``:
        when the name came in (loop time), for the login duration."""
        try:
            room, admitted = await self.relay.host(DEFAULT_ROOM_KEY, session)
        except BrokerUnavailable as exc:
            self.counts.redis_errors += 1
            log.warning("cannot log %s in: %s", name, exc)
            session.reject(UNAVAILABLE_TEXT, Refusal.UNAVAILABLE)
            return
        try:
            claim = await self.broker.claim(
                key, name, self.id, self.instance, session.id, time.time()
            )
            if claim.accepted:
                join = encode_join(name, self.id, session.id)
                entered = await self.broker.enter(
                    DEFAULT_ROOM_KEY, DEFAULT_ROOM, [Member(session.id, name, self.id, join)]
                )
        except BrokerUnavailable as exc:
            # The claim (or the join) may have gone through with only its reply lost: give
            # back whatever it may hold; a join seen by others is followed by its leave.
            self.counts.redis_errors += 1
            log.warning("cannot log %s in: %s", name, exc)
            # A leave is owed if the cluster saw the join (its event reached us).
            seen = admitted.done() and not admitted.cancelled()
            self._abandon_login(session, name, key, owed=seen)
            session.reject(UNAVAILABLE_TEXT, Refusal.UNAVAILABLE)
            return
        if not claim.accepted:
            room.forget(session)
            self.relay.release(DEFAULT_ROOM_KEY)
            session.reject(name_taken_text(name), Refusal.NAME_TAKEN)
            return
        session.key = key
        if not session.accept(claim.online):  # it hung up while we claimed
            self._abandon_login(session, name, key, owed=True)
            return
        self._by_key[key] = session
        log.info("connection %s joined as %s", session.id, name)
        join_id = entered.join_ids[0] or None
        history = await self.history_lines(DEFAULT_ROOM_KEY, self.config.history, join_id)
        room.enter(session, history)
        session.resume()
        done, _ = await asyncio.wait({admitted}, timeout=ADMIT_TIMEOUT)
        if not done:
            log.warning("join event for %s not seen in %.0fs; admitting anyway", name,
                        ADMIT_TIMEOUT)  # fmt: skip
            room.admit(session)
        if not session.closed:
            self.metrics.login_duration.observe(asyncio.get_running_loop().time() - started)

    def _abandon_login(self, session: Session, name: str, key: str, owed: bool) -> None:
        room = self.rooms.get(DEFAULT_ROOM_KEY)
        if room is not None:
            room.forget(session)
        self.relay.release(DEFAULT_ROOM_KEY)
        self.publisher.release(session.id, key, name, (DEFAULT_ROOM_KEY,), owed=owed)

    async def history_lines(self, room: str, count: int, before: str | None) -> bytes:
        """The last ``count`` messages of ``room`` (before stream id ``before``), as
        history lines; empty if there are none, none are wanted, or Redis cannot say."""
        if count <= 0:
            return b""
        try:
            messages = await self.broker.history(room, count, before)
        except BrokerUnavailable as exc:
            self.counts.redis_errors += 1
            log.warning("cannot read history: %s", exc)
            return b""
        return b"".join(
            notice_line(history_text(m.name, m.text, stream_id_key(m.id)[0] / 1000))
            for m in messages
        )
