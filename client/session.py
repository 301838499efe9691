"""A chat session that outlives its connections: login, relay, reconnect, quit.

The session logs in (asking the UI for a name when it has none), relays the user's lines
and the server's, and when the connection drops it reconnects with capped exponential
backoff and full jitter, logs in again under the same name and sends what the user typed
meanwhile. It ends when the user quits (``sair``, ``/quit``, end of input) and the server
has said goodbye.
"""

from __future__ import annotations

import asyncio
import enum
import random
import ssl
from collections import deque
from collections.abc import Callable
from typing import Protocol

from chatwire.names import DEFAULT_ROOM
from client.connection import Connection, connect
from client.errors import ConnectFailed, NameRefused
from client.protocol import (
    Closed,
    Prompted,
    Received,
    ServerLine,
    Welcomed,
    is_quit,
)
from client.protocol import (
    NameRefused as Refused,
)

#: Exit status of a session some of whose lines the server refused or never confirmed.
EXIT_REFUSED = 4
#: Backoff between reconnection attempts: full jitter over base * 2^n, capped, so that a
#: room of clients whose gateway restarted does not come back as one thundering herd.
BACKOFF_BASE, BACKOFF_CAP = 0.25, 10.0
#: Seconds a reconnecting client keeps retrying a name still held by its ghost (a gateway
#: that died holds its users' names until the cluster reaps it, which takes seconds).
NAME_RETRY_WINDOW = 30.0
#: Seconds a pipe waits, at the end of its input, for the server to answer one more of its
#: lines before it gives up on the rest (they count as not confirmed).
ANSWER_WAIT = 10.0
#: Lines read but not sent yet (while disconnected, or while the gateway paces us): past
#: this, input is not read until some are sent, so nothing is dropped and memory stays
#: bounded.
MAX_PENDING_LINES = 1000


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(
        self,
        base: float = BACKOFF_BASE,
        cap: float = BACKOFF_CAP,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base, self.cap, self._rng = base, cap, rng
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        return ceiling * self._rng()

    def reset(self) -> None:
        self.attempt = 0


class UI(Protocol):
    """What the session needs from the terminal or the pipe."""

    def show(self, line: ServerLine) -> None:
        """A line from the server (prompts, welcomes and refusals included)."""

    def status(self, text: str) -> None:
        """The client's own news: connection lost, reconnecting, back."""

    def joined(self, name: str) -> None:
        """The server accepted ``name`` for this user."""

    async def ask_name(self) -> str | None:
        """A name from the user, or None to give up."""

    async def read_input(self) -> str | None:
        """The user's next line, or None at end of input (Ctrl-D, Ctrl-C, EOF)."""


class Outcome(enum.Enum):
    QUIT = "quit"
    LOST = "lost"


class ChatSession:
    """Runs one user's chat until they leave; :meth:`run` returns the exit status."""

    def __init__(
        self,
        host: str,
        port: int,
        name: str | None,
        ui: UI,
        *,
        interactive: bool,
        give_up_after: float = 300.0,
        backoff: Backoff | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: connect (and reconnect) over TLS with this context."""
        self.host, self.port, self.name = host, port, name
        self.tls = tls
        self.ui = ui
        #: A person at a terminal can be asked for another name and quits at once; a pipe
        #: cannot be asked, and waits for the room to answer its last lines before quitting.
        self.interactive = interactive
        self.give_up_after = give_up_after
        self.backoff = backoff or Backoff()
        self._pending: deque[str] = deque()
        self._room_for_input = asyncio.Event()
        self._room_for_input.set()
        #: Lines the server refused or never confirmed, with why: the exit status says so.
        self.refused: list[tuple[str, str]] = []
        self._wake = asyncio.Event()
        self._input_done = asyncio.Event()
        self._input_task: asyncio.Task[None] | None = None
        self._quitting = False
        self._joined_once = False
        self._name_retry_until = 0.0
        self._retry_name = False
        #: The room the user was in when the connection was lost: entered again on return.
        self._room = DEFAULT_ROOM

    async def run(self) -> int:
        try:
            conn: Connection | None = await connect(self.host, self.port, tls=self.tls)
            while conn is not None:
                try:
                    outcome = await self._serve(conn)
                finally:
                    await conn.close()
                self._room = conn.protocol.room
                self._account(conn, outcome)
                if outcome is Outcome.QUIT:
                    break
                conn = await self._reconnect()
            return EXIT_REFUSED if self.refused else 0
        finally:
            if self._input_task is not None:
                self._input_task.cancel()

    # -- one connection ------------------------------------------------------------------

    async def _serve(self, conn: Connection) -> Outcome:
        sender: asyncio.Task[None] | None = None
        try:
            async for event in conn.events():
                if isinstance(event, Prompted):
                    self.ui.show(event.line)
                    if not await self._send_name(conn):
                        return Outcome.QUIT
                elif isinstance(event, Refused):
                    self.ui.show(event.line)
                    self._refused(event.line.text)
                elif isinstance(event, Welcomed):
                    self.ui.show(event.line)
                    sender = asyncio.create_task(self._send_pending(conn))
                    self._welcomed(event.name)
                elif isinstance(event, Received):
                    self.ui.show(event.line)
                    self._wake.set()  # an answer may have arrived
                elif isinstance(event, Closed):
                    break
        finally:
            if sender is not None:
                sender.cancel()
        return Outcome.QUIT if self._quitting else Outcome.LOST

    def _account(self, conn: Connection, outcome: Outcome) -> None:
        """Note, once a connection is over, the lines the server refused and those it never
        answered (they may or may not have reached the room: we cannot tell). A person at
        a terminal has seen each refusal as it came, and quits without waiting."""
        if self.interactive:
            return
        why = (
            "no answer before the connection ended"
            if outcome is Outcome.LOST
            else ("no answer from the server")
        )
        for line, reason in [*conn.protocol.refused, *((o, why) for o in conn.protocol.owed())]:
            self.refused.append((line, reason))
            self.ui.status(f"not delivered: {line[:80]!r}: {reason}")

    async def _send_name(self, conn: Connection) -> bool:
        if self._retry_name:
            self._retry_name = False
            await asyncio.sleep(self.backoff.next())  # let the cluster reap our ghost
        name = self.name if self.name is not None else await self.ui.ask_name()
        if name is None:
            self._quitting = True
            return False
        self.name = name
        conn.send_name(name)
        return True

    def _refused(self, reason: str) -> None:
        loop = asyncio.get_running_loop()
        if self._joined_once and loop.time() < self._name_retry_until:
            # Typically our own ghost: the old connection's name not yet released.
            self.ui.status(f"could not log in again as {self.name} ({reason}); retrying")
            self._retry_name = True
            return
        if not self.interactive:
            raise NameRefused(reason)
        self.name = None  # ask the person for another

    def _welcomed(self, name: str) -> None:
        if self._joined_once:
            self.ui.status(f"back in the chat as {name}")
            if self._room != DEFAULT_ROOM:
                self._pending.appendleft(f"/join {self._room}")
        self.name = name
        self.ui.joined(name)
        self._joined_once = True
        self.backoff.reset()
        if self._input_task is None:
            self._input_task = asyncio.create_task(self._read_input())

    async def _send_pending(self, conn: Connection) -> None:
        """Send the user's lines; at end of input, quit once the room has answered."""
        loop = asyncio.get_running_loop()
        answers_deadline: float | None = None
        last_due = -1
        while True:
            while self._pending and not self._quitting:
                line = self._pending.popleft()
                if is_quit(line):
                    self._quitting = True
                conn.send_line(line)
                self._room_for_input.set()
                await conn.drain()  # the gateway paces fast senders: keep in step
            if self._input_done.is_set() and not self._quitting:
                due = 0 if self.interactive else conn.protocol.answers_due
                if due != last_due:  # progress: wait on as long as answers keep coming
                    answers_deadline, last_due = loop.time() + ANSWER_WAIT, due
                assert answers_deadline is not None
                if due == 0 or loop.time() >= answers_deadline:
                    self._quitting = True
                    conn.send_line("/quit")
            self._wake.clear()
            timeout = None if answers_deadline is None else max(0, answers_deadline - loop.time())
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _read_input(self) -> None:
        while (line := await self.ui.read_input()) is not None:
            self._pending.append(line)
            self._wake.set()
            if len(self._pending) >= MAX_PENDING_LINES:
                self._room_for_input.clear()
                await self._room_for_input.wait()
        self._input_done.set()
        self._wake.set()

    # -- between connections -------------------------------------------------------------

    async def _reconnect(self) -> Connection | None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.give_up_after
        self.ui.status(f"connection to {self.host}:{self.port} lost")
        while True:
            if self._input_done.is_set() and (self.interactive or not self._pending):
                return None  # the user has left; nothing left to deliver
            delay = self.backoff.next()
            self.ui.status(f"reconnecting in {delay:.1f}s (attempt {self.backoff.attempt})")
            if self._input_done.is_set():
                await asyncio.sleep(delay)
            else:
                try:
                    async with asyncio.timeout(delay):
                        await self._input_done.wait()
                    continue  # the user quit while we waited
                except TimeoutError:
                    pass
            try:
                conn = await connect(self.host, self.port, tls=self.tls)
            except ConnectFailed as exc:
                if loop.time() >= give_up_at:
                    raise ConnectFailed(f"gave up reconnecting: {exc}") from None
                self.ui.status(str(exc))
                continue
            self._name_retry_until = loop.time() + NAME_RETRY_WINDOW
            return conn
