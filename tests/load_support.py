"""Helpers for the tests under load: a lean line client hundreds of which fit in one test
process, a log of every message the load sends, and the gateway figures a test reads.

A :class:`LeanClient` keeps reading from the moment it is welcomed (a task per
connection), as a real client must: a gateway cuts a client that lets more than 1 MiB of
output pile up. It records what it reads compactly: each chat line as the number of the
message (every message the load sends is a number, its index in the :class:`MessageLog`)
and the monotonic time it arrived; join and leave notices by name; anything else whole.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from array import array
from collections.abc import Callable, Iterable
from pathlib import Path

from gateway.health import probe
from tests.support import GatewayProcess, T, run_cli

#: Flood control, the per-address limit and join history off: the load comes from one
#: address, each client sends faster than a person, and history would only add traffic.
LOAD_FLAGS = ("--rate-limit", "0", "--max-per-address", "0", "--history", "0")

PROMPT = "* Choose a name:"
DOWN_NOTICE = (
    "* The message service is unavailable: nothing you send is delivered until it is back."
)
BACK_NOTICE = "* The message service is back."
NOT_DELIVERED = "! not delivered: the chat service is unavailable; try again"

_JOINED = " joined the chat"
_LEFT = " left the chat"
READ_CHUNK = 1 << 16


class LoginRefused(Exception):
    """The gateway answered a name with a ``! `` line (and prompted again)."""


class MessageLog:
    """Every message the load sent: its number is its index here, with sender and time."""

    def __init__(self) -> None:
        self.senders: list[LeanClient] = []
        self.sent_at = array("d")

    def add(self, sender: LeanClient) -> int:
        self.senders.append(sender)
        self.sent_at.append(time.monotonic())
        return len(self.senders) - 1

    def __len__(self) -> int:
        return len(self.senders)


class LeanClient:
    """One user on raw asyncio streams, cheap enough to run hundreds in one process."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        gateway: int,
        track_presence: bool,
    ) -> None:
        self._reader = reader
        self._writer = writer
        #: Index of the gateway it is connected to.
        self.gateway = gateway
        self.name = ""
        self._own_prefix = ""
        #: Monotonic times: welcome received; connection ended (or we left); EOF read.
        self.welcome_at: float | None = None
        self.ended_at: float | None = None
        self.eof_at: float | None = None
        #: "quit" (sair), "close" (socket closed), "dropped" (the server ended it).
        self.end: str | None = None
        #: Every chat line read: the message number and when it arrived.
        self.msg_ids = array("q")
        self.msg_times = array("d")
        self.max_id = -1
        #: Chat lines whose text is not a message number (none expected).
        self.foreign: list[str] = []
        #: Numbers of the messages this client sent, and when each came back to it.
        self.sent: list[int] = []
        self.echoes: dict[int, float] = {}
        #: When each "! not delivered" came.
        self.refused: list[float] = []
        #: Join and leave notices: name -> arrival times (kept only if track_presence).
        self.joins: dict[str, list[float]] | None = {} if track_presence else None
        self.leaves: dict[str, list[float]] | None = {} if track_presence else None
        self.presence_lines = 0
        #: Every other line, with its arrival time.
        self.other: list[tuple[float, str]] = []
        #: What broke the reader, if anything (an undecodable line, say).
        self.failure: BaseException | None = None
        self.changed = asyncio.Event()
        self._eof = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- connecting ----------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, port: int, gateway: int, track_presence: bool = False, timeout: float = 3 * T
    ) -> LeanClient:
        """Connect and read the prompt (OSError or TimeoutError if that fails)."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            client = cls(reader, writer, gateway, track_presence)
            try:
                line = await client._readline()
            except BaseException:
                writer.transport.abort()
                raise
        if line != PROMPT:
            writer.transport.abort()
            raise LoginRefused(line)
        return client

    async def _readline(self) -> str:
        raw = await self._reader.readline()
        if not raw.endswith(b"\n"):
            raise EOFError("the server closed the connection")
        return raw[:-1].decode("utf-8")

    async def login(self, name: str, timeout: float = 3 * T) -> None:
        """Answer the prompt with ``name``; from the welcome on, read continuously.

        Raises LoginRefused (the prompt that follows is consumed: call again with another
        name), EOFError, OSError or TimeoutError.
        """
        self._writer.write(name.encode() + b"\n")
        async with asyncio.timeout(timeout):
            line = await self._readline()
            if line.startswith("! "):
                if await self._readline() != PROMPT:
                    raise EOFError(f"no new prompt after {line!r}")
                raise LoginRefused(line)
        if not line.startswith(f"* Welcome, {name}! "):
            raise AssertionError(f"unexpected answer to a name: {line!r}")
        self.welcome_at = time.monotonic()
        self.name = name
        self._own_prefix = name + ": "
        self._task = asyncio.create_task(self._read(), name=f"read {name}")

    # -- reading -------------------------------------------------------------------------

    async def _read(self) -> None:
        pending = b""
        try:
            while data := await self._reader.read(READ_CHUNK):
                now = time.monotonic()
                *lines, pending = (pending + data).split(b"\n")
                for raw in lines:
                    self._line(raw.decode("utf-8"), now)
                self.changed.set()
        except (ConnectionError, OSError):
            pass
        except Exception as exc:  # a protocol violation: the test reports it
            self.failure = exc
        finally:
            now = time.monotonic()
            self.eof_at = now
            if self.ended_at is None:
                self.ended_at, self.end = now, "dropped"
            self._eof.set()
            self.changed.set()

    def _line(self, line: str, now: float) -> None:
        if line.startswith("* "):
            if line.endswith(_LEFT):
                self.presence_lines += 1
                if self.leaves is not None:
                    self.leaves.setdefault(line[2 : -len(_LEFT)], []).append(now)
                return
            if line.endswith(_JOINED):
                self.presence_lines += 1
                if self.joins is not None:
                    self.joins.setdefault(line[2 : -len(_JOINED)], []).append(now)
                return
        elif line == NOT_DELIVERED:
            self.refused.append(now)
            return
        elif not line.startswith("! "):
            _, sep, text = line.partition(": ")
            if sep and text.isdigit():
                number = int(text)
                self.msg_ids.append(number)
                self.msg_times.append(now)
                if number > self.max_id:
                    self.max_id = number
                if line.startswith(self._own_prefix):
                    self.echoes[number] = now
            else:
                self.foreign.append(line)
            return
        self.other.append((now, line))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until ``predicate()`` holds, re-checking it after each
        chunk read; False if it still does not when the time is up or the connection ends."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    if self.eof_at is not None:
                        return False
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pass
        return predicate()

    async def wait_ended(self, timeout: float) -> bool:
        """Pace the caller for ``timeout`` s, waking at once if the connection ends; True
        if it ended."""
        try:
            async with asyncio.timeout(timeout):
                await self._eof.wait()
        except TimeoutError:
            pass
        return self._eof.is_set()

    def saw_up_to(self, number: int) -> bool:
        """True once a message numbered ``number`` or later was read: for the last message
        sent (a marker), true once it was read."""
        return self.max_id >= number

    # -- writing -------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """Welcomed, and neither left nor cut off."""
        return self.welcome_at is not None and self.ended_at is None

    def say(self, log: MessageLog) -> int | None:
        """Send the next message (its number in ``log``); None if no longer connected."""
        if not self.live or self._writer.is_closing():
            return None
        number = log.add(self)
        self.sent.append(number)
        self._writer.write(b"%d\n" % number)
        return number

    def command(self, line: str) -> None:
        """Send a line that is not a message (a command such as ``/join #math``)."""
        self._writer.write(line.encode() + b"\n")

    def unsettled(self) -> int:
        """Messages sent that have neither come back nor been refused yet."""
        return len(self.sent) - len(self.echoes) - len(self.refused)

    async def settle(self, timeout: float) -> bool:
        """Wait until every message sent has come back or been refused."""
        return await self.wait_until(lambda: self.unsettled() <= 0, timeout)

    async def quit(self, timeout: float = T) -> None:
        """Leave with ``sair``; wait (bounded) for the goodbye and the close."""
        if self.ended_at is None:
            self.ended_at, self.end = time.monotonic(), "quit"
            if not self._writer.is_closing():
                self._writer.write(b"sair\n")
            await self.wait_until(lambda: self.eof_at is not None, timeout)
        await self.close()

    async def drop(self) -> None:
        """Leave by just closing the socket."""
        if self.ended_at is None:
            self.ended_at, self.end = time.monotonic(), "close"
        await self.close()

    async def close(self) -> None:
        """Close the connection (if open) and stop reading."""
        if self.ended_at is None:
            self.ended_at, self.end = time.monotonic(), "close"
        self._writer.close()
        try:
            async with asyncio.timeout(T):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            self._writer.transport.abort()
        if self._task is not None:
            try:
                async with asyncio.timeout(T):
                    await self._task
            except TimeoutError:
                self._task.cancel()


#: Lines each sender says in :func:`load_room`, and the pause between two (seconds).
LOAD_LINES = 300
LOAD_PAUSE = 0.01


async def load_room(senders: list[LeanClient], log: MessageLog, count: int = LOAD_LINES) -> None:
    """Each sender says ``count`` numbered lines, one every LOAD_PAUSE seconds."""
    for _ in range(count):
        for sender in senders:
            sender.say(log)
        await asyncio.sleep(LOAD_PAUSE)


async def users_in(gateways: list[GatewayProcess], room: str, prefix: str) -> list[LeanClient]:
    """One lean user per gateway, moved to ``room``."""
    users = [await log_in(g.port, n, f"{prefix}{n}") for n, g in enumerate(gateways)]
    for user in users:
        user.command(f"/join {room}")
    for user in users:
        assert await user.wait_until(
            lambda u=user: any(line.startswith(f"* You are in {room}") for _, line in u.other),
            3 * T,
        ), user.other
    return users


async def settle_room(
    users: list[LeanClient], senders: list[LeanClient], timeout: float = 3 * T
) -> None:
    """Wait until every line the senders said is echoed or refused, and every member has
    read every line echoed.

    Not just the highest-numbered one: lines two senders say at once may go out in either
    order, and after a failover one gateway can still be publishing lines it held while
    another's later line is already delivered."""
    for sender in senders:
        assert await sender.settle(2 * timeout), f"{sender.name}: {sender.unsettled()} unsettled"
    echoed = {n for s in senders for n in s.echoes}
    assert echoed, "nothing went through"
    for user in users:
        assert await user.wait_until(lambda u=user: echoed.issubset(u.msg_ids), timeout), (
            f"{user.name} has not read {sorted(echoed.difference(user.msg_ids))[:20]}"
        )


def _difference(first: str, a: list[int], other: str, b: list[int]) -> str:
    """Where two users' sequences part, and what each saw that the other did not."""
    at = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    return (
        f"they part at position {at} ({first}: {a[at : at + 5]}, {other}: {b[at : at + 5]}); "
        f"only {first} saw {only_a[:20]}, only {other} saw {only_b[:20]}"
    )


def gateway_logs(gateways: list[GatewayProcess], lines: int = 80) -> str:
    """The last ``lines`` lines each gateway logged, for a failure message."""
    return "\n".join(
        f"--- {g.gateway_id}:\n" + "\n".join(g.log.lines[-lines:] if g.log else [])
        for g in gateways
    )


def check_exactly_once(
    users: list[LeanClient], log: MessageLog, room_senders: list[LeanClient]
) -> None:
    """Every user of the room saw the same messages, each once, in the order each sender
    sent them; every message sent was echoed or refused."""
    sequences = [list(u.msg_ids) for u in users]
    for user, seq in zip(users, sequences, strict=True):
        assert len(seq) == len(set(seq)), f"{user.name} saw a message twice"
        assert seq == sequences[0], f"{user.name} saw another sequence: " + _difference(
            users[0].name, sequences[0], user.name, seq
        )
    for sender in room_senders:
        own = [n for n in sequences[0] if log.senders[n] is sender]
        assert own == sorted(own), f"{sender.name}'s lines out of order"
        echoed = set(sender.echoes)
        assert set(own) == echoed, f"{sender.name}'s echoes differ from what others saw"
        # Every line came back or was refused. A line can be both: when the primary dies
        # after running a write but before answering, the gateway cannot tell, and refuses
        # a line (a batch of them) that a replica had, and so everyone saw.
        assert len(sender.refused) >= len(sender.sent) - len(echoed), (
            f"{sender.name}: {len(sender.sent)} sent, {len(echoed)} echoed, "
            f"only {len(sender.refused)} refused"
        )


async def log_in(port: int, gateway: int, name: str, track_presence: bool = False) -> LeanClient:
    client = await LeanClient.connect(port, gateway, track_presence)
    try:
        await client.login(name)
    except BaseException:
        await client.close()
        raise
    return client


async def log_in_all(
    gateways: list[GatewayProcess],
    users: Iterable[tuple[int, str]],
    track_presence: bool = False,
    concurrency: int = 25,
) -> list[LeanClient]:
    """Log in each (gateway index, name), ``concurrency`` at a time, in the given order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(gateway: int, name: str) -> LeanClient:
        async with gate:
            return await log_in(gateways[gateway].port, gateway, name, track_presence)

    results = await asyncio.gather(*(one(g, n) for g, n in users), return_exceptions=True)
    clients = [r for r in results if isinstance(r, LeanClient)]
    failures = [r for r in results if not isinstance(r, LeanClient)]
    if failures:
        await asyncio.gather(*(c.close() for c in clients))
        raise AssertionError(f"{len(failures)} login(s) failed, first: {failures[0]!r}")
    return clients


async def close_all(clients: Iterable[LeanClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients))


async def who_names(redis_url: str) -> list[str]:
    """Names online according to ``chat-admin who --json``."""
    status, out, err = await run_cli("chat-admin", "--redis-url", redis_url, "who", "--json")
    assert status == 0, err
    return [user["name"] for user in json.loads(out)]


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def gateway_rss_kib(gateway: GatewayProcess) -> int:
    assert gateway.proc is not None
    return rss_kib(gateway.proc.pid)


async def health_counts(gateway: GatewayProcess) -> tuple[int, int]:
    """(users, connections) a gateway reports on GET /health (needs --health-port)."""
    url = f"http://127.0.0.1:{gateway.health_port}/health"
    healthy, detail = await asyncio.to_thread(probe, url)
    assert healthy, f"{gateway.gateway_id}: {detail}"
    match = re.search(r"(\d+) user\(s\), (\d+) connection\(s\)", detail)
    assert match, detail
    return int(match.group(1)), int(match.group(2))


def log_lines(gateway: GatewayProcess, *needles: str, limit: int = 20) -> str:
    """Up to ``limit`` lines of a gateway's log containing any of ``needles`` (evidence)."""
    assert gateway.log is not None
    hits = [line for line in gateway.log.lines if any(n in line for n in needles)]
    return "\n".join(hits[:limit])
