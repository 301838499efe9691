"""A lean chat client for load: one asyncio.Protocol per connection, no task per client.

Senders stamp each message ``SENDER:SEQ:MONOTONIC_NS``; every receiver (the sender
included) measures end-to-end latency on arrival and checks each sender's sequence, so a
run reports latency, loss, duplicates and order violations for every delivery. A client
made *unchecked* only counts the chat lines it gets (a few scans of each read, no line
parsed): every delivery is still counted, and the checked clients stand for the others'
latency and order, for a generator that costs a fraction as much per delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from dataclasses import dataclass, field
from typing import cast

from chatwire.texts import PROMPT, notice_line

PROMPT_LINE = notice_line(PROMPT).rstrip(b"\n")


@dataclass
class Stats:
    """What all receivers saw, pooled (one object, so a delivery costs a few attribute ops)."""

    latencies_us: array[int] = field(default_factory=lambda: array("Q"))
    deliveries: int = 0
    duplicates_or_reordered: int = 0
    notices: int = 0
    recording: bool = True
    #: Set once ``deliveries`` reaches ``target``.
    target: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        self.latencies_us = array("Q")
        self.deliveries = self.duplicates_or_reordered = self.notices = 0
        self.target = 0
        self.reached.clear()

    async def wait_for(self, target: int, patience: float) -> None:
        """Wait until ``target`` deliveries have come, or ``patience`` seconds have passed
        (what has not come by then counts as lost)."""
        self.target = target
        if self.deliveries >= target:
            self.reached.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                await self.reached.wait()


class LoadClient(asyncio.Protocol):
    """One benchmark connection: logs in, then counts every line it receives and, if
    ``checked``, checks its order and measures its latency."""

    __slots__ = ("_buffer", "_last", "checked", "name", "room", "stats", "transport", "welcomed")

    def __init__(
        self, name: str, stats: Stats, senders: int, room: str | None = None, checked: bool = True
    ) -> None:
        self.name = name.encode()
        #: False: once logged in, count the chat lines that come, without reading them.
        self.checked = checked
        #: The room to move to after logging in (None: stay in the default room).
        self.room = room
        self.stats = stats
        self._buffer = b""
        self._last = [-1] * senders  # last sequence number seen from each sender
        self.transport: asyncio.Transport | None = None
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Any transport with the Transport methods will do (uvloop's is no subclass).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.checked and self.welcomed.done():
            self._count(data)
            return
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        now_us = time.monotonic_ns() // 1000
        stats = self.stats
        last = self._last
        record = stats.latencies_us.append if stats.recording else None
        for line in lines:
            head, sep, body = line.partition(b": ")
            if not sep or head[:1] in (b"*", b"!"):
                self._notice(line)
                continue
            sender, seq, stamp = body.split(b":")
            s, q = int(sender), int(seq)
            if q > last[s]:
                last[s] = q
            else:
                stats.duplicates_or_reordered += 1
            stats.deliveries += 1
            if record is not None:
                record(now_us - int(stamp) // 1000)
        if stats.target and stats.deliveries >= stats.target:
            stats.reached.set()

    def _count(self, data: bytes) -> None:
        """An unchecked client's read: its whole lines counted, notices apart (a line
        starting with ``*`` or ``!``), none of them split or parsed."""
        if self._buffer:
            data = self._buffer + data
        end = data.rfind(b"\n") + 1
        self._buffer = data[end:]
        if not end:
            return
        notices = data.count(b"\n*", 0, end) + data.count(b"\n!", 0, end)
        notices += data[:1] in (b"*", b"!")
        stats = self.stats
        stats.notices += notices
        stats.deliveries += data.count(b"\n", 0, end) - notices
        if stats.target and stats.deliveries >= stats.target:
            stats.reached.set()

    def _notice(self, line: bytes) -> None:
        self.stats.notices += 1
        if not self.welcomed.done():
            assert self.transport is not None
            if line.startswith(PROMPT_LINE):
                self.transport.write(self.name + b"\n")
            elif line.startswith(b"* Welcome"):
                if self.room is None:
                    self.welcomed.set_result(None)
                else:
                    self.transport.write(f"/join {self.room}\n".encode())
            elif line.startswith(b"* You are in #"):
                self.welcomed.set_result(None)
            elif line.startswith(b"!"):
                self.welcomed.set_exception(RuntimeError(line.decode(errors="replace")))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(f"{self.name!r} lost: {exc}"))

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def connect_all(
    addresses: list[tuple[str, int]],
    count: int,
    stats: Stats,
    senders: int,
    prefix: str,
    concurrency: int = 200,
    room: str | None = None,
    failures: list[str] | None = None,
    deadline: float | None = None,
    indices: list[int] | None = None,
    check_every: int = 1,
) -> list[LoadClient]:
    """``count`` logged-in clients spread round-robin over ``addresses`` (each moved to
    ``room`` if given), in that order: client i is on address i mod n, whichever logged
    in first, so the first k (a workload's senders) are spread evenly too. A client that
    cannot log in voids the run (:class:`LoginFailed`), unless ``failures`` is given: then
    it is listed there and the others are returned. Past ``deadline``
    (``time.monotonic()``) no login starts: each left is a failure. ``indices``: make only
    these clients of the ``count`` (a share of them, in one generator process of several),
    returned in that order. ``check_every``: only client 0 and every such one after it
    checks what it gets; the others count it (:attr:`LoadClient.checked`)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    placed: dict[int, LoadClient] = {}
    failed: list[str] = [] if failures is None else failures

    async def one(index: int) -> None:
        host, port = addresses[index % len(addresses)]
        async with gate:
            if deadline is not None and time.monotonic() > deadline:
                failed.append("not tried: out of time")
                return
            checked = index % check_every == 0
            client = LoadClient(f"{prefix}{index}", stats, senders, room, checked)
            try:
                await loop.create_connection(lambda: client, host, port)
                await asyncio.wait_for(client.welcomed, 30)
            except (OSError, RuntimeError, TimeoutError) as exc:
                failed.append(str(exc) or type(exc).__name__)
                if client.transport is not None:
                    client.transport.close()
                return
            placed[index] = client

    await asyncio.gather(*(one(i) for i in (range(count) if indices is None else indices)))
    clients = [placed[index] for index in sorted(placed)]
    if failed and failures is None:
        for client in clients:
            if client.transport is not None:
                client.transport.close()
        raise LoginFailed(len(failed), count, failed[0])
    return clients


class LoginFailed(Exception):
    """Some benchmark clients could not log in: the run is void."""

    def __init__(self, failed: int, total: int, first: str) -> None:
        super().__init__(f"{failed} of {total} clients could not log in (first: {first})")
        self.failed, self.total, self.first = failed, total, first


class Senders:
    """Paced senders: every tick, each sender writes the messages now due at its rate.

    Senders are out of phase with each other (sender s of S starts s/S of a period late),
    as independent people are: in step, they would send in bursts, and every receiver
    would measure its own queueing of each burst as latency.
    """

    TICK = 0.002

    def __init__(
        self,
        clients: list[LoadClient],
        offset: int = 0,
        numbers: list[int] | None = None,
        of: int | None = None,
    ) -> None:
        """``offset``: the first sender number these senders stamp (several pacers can
        then share receivers). ``numbers``: the sender numbers they stamp instead, and
        ``of``: how many senders there are in all (a share of them, in one generator
        process of several; the phases are spread over all of them)."""
        self.clients = clients
        self.offset = offset
        self._positions = list(range(len(clients))) if numbers is None else numbers
        self._of = of if of is not None else len(clients)
        #: Sequence numbers go on across runs, so receivers' order checks stay valid.
        self.sent = [0] * len(clients)

    async def run(self, rate: float, duration: float) -> int:
        """Send ``rate`` messages a second per sender for ``duration`` seconds; returns
        how many were sent."""
        start = time.monotonic()
        end = start + duration
        first = list(self.sent)
        phase = [position / self._of for position in self._positions]
        while (now := time.monotonic()) < end:
            stamp = time.monotonic_ns()
            elapsed = (now - start) * rate
            for s, client in enumerate(self.clients):
                due = first[s] + int(elapsed + 1 - phase[s])
                seq = self.sent[s]
                if seq < due:
                    n = self._positions[s] + self.offset
                    client.send(b"".join(f"{n}:{q}:{stamp}\n".encode() for q in range(seq, due)))
                    self.sent[s] = due
            await asyncio.sleep(self.TICK)
        return sum(self.sent) - sum(first)
