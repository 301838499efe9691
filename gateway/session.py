"""One client connection: the thin asyncio adapter around :class:`ServerProtocol`.

The session turns transport callbacks into protocol input and protocol events into calls
on its :class:`Hub` (the gateway); it owns the connection's two bounds (unpublished input,
queued output) and reports its own end exactly once, from ``connection_lost``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Protocol, assert_never, cast

from chatwire.commands import Request
from chatwire.texts import (
    INTERNAL_ERROR_TEXT,
    NOT_DELIVERED_TEXT,
    kicked_text,
    slow_down_text,
)
from gateway.metrics import Counts, Refusal
from gateway.protocol import (
    CommandRequested,
    Event,
    MessageReceived,
    NameRequested,
    PeerClosed,
    QuitRequested,
    ServerProtocol,
    State,
)
from gateway.ratelimit import TokenBucket
from gateway.transport import LineTransport

log = logging.getLogger(__name__)

#: Bytes queued for one client before it counts as not reading and is disconnected. 1 MiB
#: is several thousand chat lines: a client that is merely slow catches up long before,
#: while the memory a stuck one can pin stays small even with thousands of them.
MAX_OUTGOING_BYTES = 1 << 20

#: Lines from one client accepted but not yet published. Past it we stop reading that
#: client (TCP pushes back on it) until Redis catches up; the room is never flooded
#: faster than Redis takes it, and nothing read is dropped.
MAX_UNPUBLISHED = 64


class Hub(Protocol):
    """What a session needs from its gateway."""

    def session_started(self, session: Session) -> None: ...
    def session_ended(self, session: Session) -> None: ...
    def login(self, session: Session, name: str, key: str) -> None: ...
    def publish(self, session: Session, text: str) -> None: ...
    def command(self, session: Session, request: Request) -> None: ...
    def hold_input(self, session: Session) -> bool:
        """Whether ``session``, whose lines wait to be published, should stop reading until
        the next batch goes (then :meth:`Session.read_now` is called)."""
        ...


class Session(asyncio.Protocol):
    """One client of the gateway: a TCP connection on its plain port, or on its TLS port
    once the handshake is done (this is its asyncio protocol), or a WebSocket
    (:mod:`gateway.web.transport` drives the same callbacks)."""

    __slots__ = (
        "_bucket",
        "_closing",
        "_counts",
        "_hub",
        "_limits",
        "_pacing",
        "_paused",
        "_proto",
        "_told_slow",
        "_transport",
        "_unpublished",
        "_waiting",
        "closed",
        "id",
        "joined",
        "key",
        "peer",
        "tls",
    )

    def __init__(
        self,
        hub: Hub,
        session_id: str,
        limits: tuple[float, float] | None = None,
        counts: Counts | None = None,
    ) -> None:
        """``limits``: (lines a second, burst) allowed from this client; None: no limit.
        ``counts``: the gateway's tallies (refusals, flood delays, cuts, kicks)."""
        self._hub = hub
        self._limits = limits
        self._counts = counts if counts is not None else Counts()
        self._bucket: TokenBucket | None = None  # made at the first line: idle clients pay nothing
        #: Over its rate: input waits (unread, in the kernel) until this timer refills it.
        self._pacing: asyncio.TimerHandle | None = None
        self._told_slow = False
        self._proto = ServerProtocol(self._counts)
        self._transport: LineTransport | None = None
        self._unpublished = 0
        #: A name claim or a move is under way: input waits for its outcome.
        self._waiting = False
        self._paused = False
        self._closing = False
        #: Cluster-wide unique id of this connection (presence records name it).
        self.id = session_id
        self.peer = "?"
        #: The folded name this session holds in presence, once claimed.
        self.key: str | None = None
        #: True once the name claim succeeded: presence must be released at the end.
        self.joined = False
        #: True once the transport is gone.
        self.closed = False
        #: True on the TLS port (the handshake is done by the time the session starts).
        self.tls = False

    @property
    def address(self) -> str:
        """The client's address without its port (what per-address limits count)."""
        return self.peer.rpartition(":")[0]

    @property
    def name(self) -> str | None:
        return self._proto.name

    @property
    def room(self) -> str:
        """The current room, as it is shown."""
        return self._proto.room

    @property
    def room_key(self) -> str:
        """The current room's folded name."""
        return self._proto.room_key

    # -- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Any transport with the Transport methods will do (uvloop's is no subclass).
        self.attach(cast(LineTransport, transport))

    def attach(self, transport: LineTransport) -> None:
        """The connection is up: count it in (or refuse it) and send the prompt."""
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.tls = transport.get_extra_info("ssl_object") is not None
        self._hub.session_started(self)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._proto.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self._proto.receive_eof()
        self._process()
        # We close once every line sent before the EOF is answered. TLS has no half-open
        # connection: its transport closes after an EOF whatever we answer (and logs a
        # warning if we ask it to stay open).
        return not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._pacing is not None:
            self._pacing.cancel()
            self._pacing = None
        self._proto.close()
        self._hub.session_ended(self)

    # -- decisions from the gateway ------------------------------------------------------

    def accept(self, online: int) -> bool:
        """The name is ours: welcome the user. Input waits for :meth:`resume` (the room's
        history comes first). False if the connection is gone meanwhile."""
        if self.closed or self._proto.state is not State.CLAIMING:
            return False
        self.joined = True
        self._proto.accept_name(online)
        self._flush()
        return True

    def reject(self, reason: str, why: Refusal) -> None:
        """The claim failed: say why (``reason``, counted as ``why``), prompt again, read on."""
        if self.closed or self._proto.state is not State.CLAIMING:
            return
        self._counts.refuse(why)
        self._proto.reject_name(reason)
        self.resume()

    def moved(self, room: str, key: str, members: int) -> None:
        """The move is done: say where the user is now. Input waits for :meth:`resume`."""
        if self._proto.state is State.MOVING:
            self._proto.moved(room, key, members)
            self._flush()

    def move_failed(self, reason: str) -> None:
        """The move did not happen: say why, read on."""
        if self._proto.state is State.MOVING:
            if reason:
                self._counts.refuse(Refusal.UNAVAILABLE)
            self._proto.move_failed(reason)
        self.resume()

    def resume(self) -> None:
        """The claim or move is settled: handle the input that waited for it."""
        self._waiting = False
        if not self.closed:
            self._process()

    def read_now(self) -> None:
        """The gateway is about to publish: take in what this client sent since its input
        was held (:meth:`Hub.hold_input`), so that it goes in the same batch."""
        if not self.closed:
            self._set_paused(self._must_wait())

    def published(self, delivered: bool) -> None:
        """One of this client's lines left the publish queue (``delivered`` or refused)."""
        self._unpublished -= 1
        if not delivered and not self.closed:
            self._counts.refuse(Refusal.UNAVAILABLE)
            self._proto.send_error(NOT_DELIVERED_TEXT)
            self._flush()
        self._update_reading()

    def notify(self, texts: list[str]) -> None:
        """Send ``* `` lines to this client only."""
        self._proto.send_notices(texts)
        self._flush()

    def error(self, text: str, why: Refusal | None) -> None:
        """Send a ``! `` line to this client only; ``why``: what it refused, if anything."""
        if why is not None:
            self._counts.refuse(why)
        self._proto.send_error(text)
        self._flush()

    def write(self, data: bytes) -> None:
        """Queue encoded room traffic, disconnecting the client if it stopped reading.

        Never blocks and never awaits: the fan-out to everyone else goes on regardless.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() + len(data) > MAX_OUTGOING_BYTES:
            log.warning(
                "%s (%s) stopped reading: over %d bytes queued; disconnecting",
                self.name or self.peer,
                self.id,
                MAX_OUTGOING_BYTES,
            )
            self._counts.slow_readers_cut += 1
            transport.abort()
            return
        transport.write(data)

    def kick(self, reason: str) -> None:
        """An operator removed this user: say so and close (the leave follows as usual)."""
        log.info("%s (%s) kicked by an operator: %s", self.name, self.id, reason or "no reason")
        self._counts.kicks += 1
        self._proto.send_error(kicked_text(reason))
        self.close()

    def close(self, notice: str | None = None) -> None:
        """Send a last ``* `` line (if given) and close once it is written."""
        self._proto.close(notice)
        self._closing = True
        self._flush()

    def stop_reading(self) -> None:
        """Read nothing more from this client (shutdown)."""
        self._proto.close()
        if self._transport is not None:
            self._transport.pause_reading()

    def abort(self) -> None:
        """Drop the connection now, discarding unsent output."""
        if self._transport is not None:
            self._transport.abort()

    # -- internals -----------------------------------------------------------------------

    def _process(self) -> None:
        try:
            # Take lines in as far as the budget goes; a /join or a claim stops the loop
            # until it is settled (resume), flood control until a token is due (_paced).
            while not self._closing and self._pacing is None:
                budget = self._budget()
                if budget == 0:
                    if self._proto.has_input():
                        self._slow_down()
                    break
                before = self._proto.lines_taken
                events = self._proto.events_received(budget)
                taken = self._proto.lines_taken - before
                if self._bucket is not None and taken:
                    self._bucket.spend(taken, time.monotonic())
                for event in events:
                    self._dispatch(event)
                    if self._closing:
                        break
                if not taken and not events:
                    break
        except Exception:
            # Nothing raises into the event loop: log it, tell the client no details, close.
            log.exception("unexpected error handling input from %s (%s)", self.peer, self.id)
            self._counts.refuse(Refusal.INTERNAL)
            self._proto.send_error(INTERNAL_ERROR_TEXT)
            self._proto.close()
            self._closing = True
        self._update_reading()
        self._flush()

    def _budget(self) -> int | None:
        """Lines that may be taken in now (None: no limit)."""
        if self._limits is None:
            return None
        now = time.monotonic()
        if self._bucket is None:
            self._bucket = TokenBucket(*self._limits, now)
        elif self._told_slow and self._bucket.full(now):
            self._told_slow = False  # back within the rate: a next episode is told again
        return self._bucket.available(now)

    def _slow_down(self) -> None:
        """Over the rate: read nothing more until a line's worth has refilled. What the
        client sends meanwhile waits in its socket, in order: delayed, never dropped."""
        assert self._bucket is not None and self._limits is not None
        self._counts.flood_delays += 1
        if not self._told_slow:
            self._told_slow = True
            self._proto.send_notice(slow_down_text(self._limits[0]))
        self._pacing = asyncio.get_running_loop().call_later(
            self._bucket.wait(time.monotonic()), self._paced
        )

    def _paced(self) -> None:
        self._pacing = None
        if not self.closed:
            self._process()

    def _dispatch(self, event: Event) -> None:
        match event:
            case MessageReceived(text=text):
                self._unpublished += 1
                self._hub.publish(self, text)
            case CommandRequested(request=request):
                self._waiting = self._proto.state is State.MOVING
                self._hub.command(self, request)
            case NameRequested(name=name, key=key):
                self._waiting = True
                self._hub.login(self, name, key)
            case QuitRequested() | PeerClosed():
                self._closing = True
            case _:
                assert_never(event)

    def set_keepalive(self, idle: int, interval: int, count: int) -> None:
        """Have the kernel notice a client whose host vanished without closing."""
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        # Keepalive probes wait while sent data is unacknowledged; this bounds that case.
        sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, (idle + interval * count) * 1000
        )

    def refuse_line(self, reason: str) -> None:
        """Refuse one line the transport could not frame (a WebSocket frame with a line
        break inside): a ``! `` line, as for a line too long; the connection goes on."""
        if not self.closed:
            self._counts.refuse(Refusal.INVALID)
            self._proto.refuse_line(reason)
            self._flush()

    def refuse(self, reason: str, *, notice: bool = False) -> None:
        """Turn the connection away before it starts: a ``! `` line (a ``* `` line with
        ``notice``), then close."""
        self._proto.data_to_send()  # the prompt is not sent
        if notice:
            self._proto.send_notice(reason)
        else:
            self._counts.refuse(Refusal.FULL)
            self._proto.send_error(reason)
        self._proto.close()
        self._closing = True
        self._flush()

    def _flush(self) -> None:
        data = self._proto.data_to_send()
        if data:
            self.write(data)
        if self._closing and self._transport is not None:
            self._transport.close()

    def _must_wait(self) -> bool:
        """Input waits for a claim or move, for flood control, or for Redis to catch up."""
        return self._waiting or self._pacing is not None or self._unpublished >= MAX_UNPUBLISHED

    def _update_reading(self) -> None:
        # Lines waiting for a busy gateway's next batch: what follows them can wait in
        # the kernel too, and be read just before that batch goes (one read, not many).
        self._set_paused(
            self._must_wait() or (self._unpublished > 0 and self._hub.hold_input(self))
        )

    def _set_paused(self, pause: bool) -> None:
        if pause == self._paused or self._transport is None or self._transport.is_closing():
            return
        self._paused = pause
        if pause:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()
