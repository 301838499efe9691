"""The benchmark's workloads: fixed rate, saturation, idle connections, many rooms, a
flooder, a login storm."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench.load import LoadClient, Senders, Stats, connect_all
from bench.procs import Cluster, rss_bytes, self_cpu_seconds
from bench.shards import Shards

#: Seconds to wait, after the last message was sent, for the last deliveries.
DRAIN_TIMEOUT = 5.0
#: Seconds a login storm's client waits for its welcome before it counts as never in.
LOGIN_TIMEOUT = 30.0
#: The label of the load generator's own CPU in a run's ``cpu_seconds``; every other label
#: is a server process (a gateway, a Redis, the classroom server).
GENERATOR = "generator"
#: Share of its cores (one per generator process) above which the load generator, not the
#: server, is taken to be what limits a step: past it, it reads late whatever the server.
GENERATOR_BOUND = 0.8


def server_cpu_us(cpu_seconds: dict[str, float], count: int) -> float | None:
    """Microseconds of server CPU (every process but the generator) per one of ``count``
    (deliveries, logins); None if there were none."""
    if not count:
        return None
    server = sum(v for label, v in cpu_seconds.items() if label != GENERATOR)
    return round(server / count * 1e6, 3)


def all_cpu_us(cpu_seconds: dict[str, float], count: int) -> float | None:
    """Microseconds of CPU of every process, the generator included, per one of ``count``.

    On loopback the kernel sends a segment that Nagle's algorithm held back when the
    reader's acknowledgement comes in, in the reader's process: a server with Nagle on (the
    classroom's) has some of its sending charged to the generator. Server CPU alone then
    flatters it; this figure does not depend on which side the kernel charged."""
    if not count:
        return None
    return round(sum(cpu_seconds.values()) / count * 1e6, 3)


def percentile(sorted_values: list[int], p: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[index] / 1000.0  # microseconds -> milliseconds


@dataclass
class Run:
    """One measured interval's figures."""

    name: str
    clients: int
    senders: int
    offered_msgs_per_s: float
    sent: int
    expected_deliveries: int
    deliveries: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    lost: int
    duplicates_or_reordered: int
    cpu_seconds: dict[str, float]
    #: Processes the load generator ran as (its CPU is theirs together).
    generators: int = 1
    #: 1 in how many clients checked order and measured latency (the others counted).
    check_every: int = 1
    #: The generator's CPU while it sent, as a share of its cores (1.0: every process of
    #: it busy throughout); None if unknown.
    generator_load: float | None = None

    @property
    def deliveries_per_s(self) -> float:
        return self.deliveries / self.seconds if self.seconds else 0.0

    @property
    def generator_bound(self) -> bool:
        """Whether the generator was busy enough to be this run's limit
        (:data:`GENERATOR_BOUND`)."""
        load = self.generator_load
        return load is not None and load >= GENERATOR_BOUND

    @property
    def server_cpu_us_per_delivery(self) -> float | None:
        """CPU of every gateway and Redis (or of the classroom server) per delivery, in µs."""
        return server_cpu_us(self.cpu_seconds, self.deliveries)

    @property
    def all_cpu_us_per_delivery(self) -> float | None:
        """CPU of every process, the generator included, per delivery, in µs."""
        return all_cpu_us(self.cpu_seconds, self.deliveries)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["deliveries_per_s"] = round(self.deliveries_per_s)
        out["server_cpu_us_per_delivery"] = self.server_cpu_us_per_delivery
        out["all_cpu_us_per_delivery"] = self.all_cpu_us_per_delivery
        out["generator_bound"] = self.generator_bound
        return out


def limited_by_generator(runs: list[Run], best: Run | None) -> bool:
    """Whether a saturation ramp stopped at the load generator's limit, not the server's:
    the step that ended it had the generator busy (:attr:`Run.generator_bound`). The
    server's own limit is then higher than the sustainable rate found, by an unknown
    amount, and two servers stopped so compare only their generators (``--generators``
    gives it more processes). False if no step ended the ramp (it ran out of steps)."""
    return bool(runs) and runs[-1] is not best and runs[-1].generator_bound


async def _measure(
    name: str,
    cluster: Cluster,
    clients: int,
    senders: int,
    offered: float,
    stats: Stats,
    send: Callable[[], Awaitable[tuple[int, int]]],
) -> Run:
    """Run ``send`` (which returns messages sent and deliveries expected of them), wait
    for the deliveries, and take the figures."""
    stats.reset()
    before = cluster.cpu() | {GENERATOR: self_cpu_seconds()}
    started = time.monotonic()
    sent, expected = await send()
    sending = (time.monotonic() - started, self_cpu_seconds() - before[GENERATOR])
    await stats.wait_for(expected, DRAIN_TIMEOUT)
    elapsed = time.monotonic() - started
    after = cluster.cpu() | {GENERATOR: self_cpu_seconds()}
    return _run(
        name, clients, senders, offered, sent, expected,
        (stats.deliveries, stats.duplicates_or_reordered, stats.latencies_us),
        elapsed, before, after, sending=sending,
    )  # fmt: skip


def _run(
    name: str,
    clients: int,
    senders: int,
    offered: float,
    sent: int,
    expected: int,
    seen: tuple[int, int, array[int]],
    elapsed: float,
    before: dict[str, float],
    after: dict[str, float],
    generators: int = 1,
    sending: tuple[float, float] | None = None,
) -> Run:
    """A run's figures from what the receivers ``seen``: deliveries, duplicates or
    reordered, latencies (µs); and the CPU seconds of each process ``before`` and
    ``after`` (the generator's over ``generators`` processes). ``sending``: how long the
    generator sent, and its CPU seconds meanwhile."""
    deliveries, duplicates, latencies_us = seen
    latencies = sorted(latencies_us)
    load = None
    if sending is not None and sending[0] > 0:
        load = round(sending[1] / (sending[0] * generators), 2)
    return Run(
        name=name,
        clients=clients,
        senders=senders,
        offered_msgs_per_s=offered,
        sent=sent,
        expected_deliveries=expected,
        deliveries=deliveries,
        seconds=round(elapsed, 2),
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        max_ms=latencies[-1] / 1000.0 if latencies else float("nan"),
        lost=max(0, expected - deliveries + duplicates),
        duplicates_or_reordered=duplicates,
        cpu_seconds={k: round(after[k] - before[k], 2) for k in before},
        generators=generators,
        generator_load=load,
    )


async def _sharded_step(
    name: str, cluster: Cluster, shards: Shards, senders: int, rate: float, duration: float
) -> Run:
    """One room's step with the generator over several processes: the same figures as
    :func:`_one_room`, the generator's CPU being every generator process's."""

    def cpu() -> dict[str, float]:
        return cluster.cpu() | {GENERATOR: self_cpu_seconds() + shards.cpu()}

    clients = sum(shards.sizes)
    await shards.reset()
    before = cpu()
    started = time.monotonic()
    sent = await shards.send(rate, duration)
    sending = (time.monotonic() - started, cpu()[GENERATOR] - before[GENERATOR])
    pooled = await shards.drain(sent, DRAIN_TIMEOUT)
    elapsed = time.monotonic() - started
    seen = (pooled.deliveries, pooled.duplicates_or_reordered, pooled.latencies_us)
    return _run(
        name, clients, senders, rate * senders, sent, sent * clients, seen, elapsed, before,
        cpu(), generators=len(shards.sizes), sending=sending,
    )  # fmt: skip


async def _one_room(
    name: str,
    cluster: Cluster,
    clients: list[LoadClient],
    pacer: Senders,
    stats: Stats,
    rate: float,
    duration: float,
) -> Run:
    """Every client in one room: each message sent reaches every client."""

    async def send() -> tuple[int, int]:
        sent = await pacer.run(rate, duration)
        return sent, sent * len(clients)

    offered = rate * len(pacer.clients)
    return await _measure(name, cluster, len(clients), len(pacer.clients), offered, stats, send)


async def fixed(
    cluster: Cluster,
    clients: int,
    senders: int,
    rate: float,
    duration: float,
    flooder: bool = False,
) -> Run:
    """N clients, S senders x R messages/s for D seconds; with ``flooder``, one more
    client on the first gateway writes lines as fast as the gateway takes them meanwhile
    (in a room of its own, so that the figures are the others')."""
    stats = Stats()
    pool = await connect_all(cluster.gateways, clients, stats, senders, "f")
    flood: list[LoadClient] = []
    if flooder:
        flood = await connect_all(cluster.gateways[:1], 1, Stats(), 1, "flood", room="#flood")
    try:
        await asyncio.sleep(0.5)  # let the join notices of the last logins pass
        pacer = Senders(pool[:senders])
        task = asyncio.create_task(_flood(flood[0])) if flood else None
        try:
            return await _one_room(
                "flooded" if flood else "fixed", cluster, pool, pacer, stats, rate, duration
            )
        finally:
            if task is not None:
                task.cancel()
    finally:
        for client in pool + flood:
            if client.transport is not None:
                client.transport.close()


async def _flood(client: LoadClient) -> None:
    """Write lines as fast as the gateway takes them (it paces us by not reading)."""
    transport = client.transport
    assert transport is not None
    line = b"0:0:0\n" * 64  # parsed like any message by its own client, then ignored
    while True:
        if transport.get_write_buffer_size() < 1 << 16:
            transport.write(line)
        await asyncio.sleep(0.001)


async def saturation(
    cluster: Cluster,
    clients: int,
    senders: int,
    start_rate: float,
    factor: float,
    steps: int,
    step_seconds: float,
    max_p99_ms: float = 100.0,
    generators: int = 1,
    check_every: int = 1,
) -> tuple[list[Run], Run | None]:
    """Step the offered rate up until loss appears or p99 passes ``max_p99_ms``; the best
    step without either is the sustainable rate. ``generators``: the load generator's
    processes (:mod:`bench.shards`; 1: this one alone). ``check_every``: 1 in how many
    clients checks order and measures latency; the others only count what they get
    (a cheaper generator: every delivery is still counted)."""
    step: Callable[[str, float], Awaitable[Run]]
    close: Callable[[], Awaitable[None]]
    if generators > 1:
        shards = await Shards.start(
            generators, cluster.gateways, clients, senders, "s", check_every
        )

        def step(name: str, rate: float) -> Awaitable[Run]:
            return _sharded_step(name, cluster, shards, senders, rate, step_seconds)

        close = shards.stop
    else:
        stats = Stats()
        pool = await connect_all(
            cluster.gateways, clients, stats, senders, "s", check_every=check_every
        )
        pacer = Senders(pool[:senders])

        def step(name: str, rate: float) -> Awaitable[Run]:
            return _one_room(name, cluster, pool, pacer, stats, rate, step_seconds)

        async def close() -> None:
            for client in pool:
                if client.transport is not None:
                    client.transport.close()

    runs: list[Run] = []
    best: Run | None = None
    try:
        await asyncio.sleep(0.5)
        rate = start_rate
        for n in range(steps):
            run = dataclasses.replace(await step(f"step {n + 1}", rate), check_every=check_every)
            runs.append(run)
            if run.lost or run.duplicates_or_reordered or run.p99_ms > max_p99_ms:
                break
            if run.sent < 0.9 * rate * min(senders, clients) * step_seconds:
                break  # the generator could not offer the rate: it is the bottleneck
            if best is None or run.deliveries_per_s > best.deliveries_per_s:
                best = run
            rate *= factor
            await asyncio.sleep(1.0)  # let queues empty between steps
    finally:
        await close()
    return runs, best


@dataclass
class IdleRun:
    connections: int  # registered
    seconds_to_register: float
    rss_before: int
    rss_after: int
    #: Asked for but not registered (only where failures are tolerated: the classroom).
    not_registered: int = 0
    #: RSS of every server process (gateways and Redis, or the classroom server).
    server_rss_before: int = 0
    server_rss_after: int = 0

    @property
    def bytes_per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / self.connections if self.connections else 0

    @property
    def server_bytes_per_connection(self) -> float:
        grown = self.server_rss_after - self.server_rss_before
        return grown / self.connections if self.connections else 0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["kib_per_connection"] = round(self.bytes_per_connection / 1024, 2)
        out["server_kib_per_connection"] = round(self.server_bytes_per_connection / 1024, 2)
        return out


async def idle(cluster: Cluster, connections: int, budget: float | None = None) -> IdleRun:
    """K registered idle clients on the first gateway (or the classroom server): memory
    per connection, time to register them all. With ``budget`` (seconds), no login starts
    after it and those that fail are counted, not fatal: the figures are of the clients
    that got in."""
    stats = Stats()
    stats.recording = False
    pid = cluster.server_pid(0)
    before = rss_bytes(pid) if pid else 0
    servers_before = _server_rss(cluster)
    started = time.monotonic()
    failures: list[str] | None = None if budget is None else []
    deadline = None if budget is None else started + budget
    try:
        pool = await connect_all(
            cluster.gateways[:1], connections, stats, 1, "i", concurrency=500,
            failures=failures, deadline=deadline,
        )  # fmt: skip
    except Exception:
        print(cluster.log_tail())
        raise
    took = time.monotonic() - started
    await asyncio.sleep(1.0)  # let the notices of the last joins settle
    after = rss_bytes(pid) if pid else 0
    servers_after = _server_rss(cluster)
    for client in pool:
        if client.transport is not None:
            client.transport.close()
    return IdleRun(
        len(pool), round(took, 2), before, after, connections - len(pool),
        servers_before, servers_after,
    )  # fmt: skip


def _server_rss(cluster: Cluster) -> int:
    """The RSS of every server process (every one in ``pids``), summed."""
    return sum(rss_bytes(pid) for pid in cluster.pids.values())


@dataclass
class RoomsRun:
    """The many-rooms workload's figures: the room traffic as a whole (``run``) and what
    each gateway received from the bus against what its own rooms carried."""

    run: Run
    rooms: int
    inbound: list[int]  # bus messages each gateway received during the run
    own_traffic: list[int]  # messages published in the rooms each gateway hosts

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.run.as_dict(),
            "rooms": self.rooms,
            "gateway_inbound_messages": self.inbound,
            "gateway_own_room_messages": self.own_traffic,
        }


async def rooms(
    cluster: Cluster,
    small_rooms: int,
    room_size: int,
    big_room: int,
    big_senders: int,
    big_rate: float,
    small_rate: float,
    duration: float,
) -> RoomsRun:
    """``small_rooms`` rooms of ``room_size``, each on one gateway (room r on gateway r mod
    G) with one sender at ``small_rate``; plus one room of ``big_room`` members spread over
    every gateway with ``big_senders`` senders at ``big_rate``."""
    stats = Stats()
    gateways = cluster.gateways
    senders = big_senders + small_rooms
    big = await connect_all(gateways, big_room, stats, senders, "b", room="#big")
    small: list[list[LoadClient]] = []
    for r in range(small_rooms):
        where = [gateways[r % len(gateways)]]
        small.append(await connect_all(where, room_size, stats, senders, f"r{r}-", room=f"#r{r}"))
    everyone = big + [c for room in small for c in room]
    try:
        await asyncio.sleep(1.0)  # let the last joins pass
        big_pacer = Senders(big[:big_senders])
        small_pacer = Senders([room[0] for room in small], offset=big_senders)
        inbound_before = [s["bus_messages"] for s in cluster.stats()]

        async def send() -> tuple[int, int]:
            big_sent, small_sent = await asyncio.gather(
                big_pacer.run(big_rate, duration), small_pacer.run(small_rate, duration)
            )
            return big_sent + small_sent, big_sent * big_room + small_sent * room_size

        offered = big_rate * big_senders + small_rate * small_rooms
        run = await _measure("rooms", cluster, len(everyone), senders, offered, stats, send)
        inbound = [
            s["bus_messages"] - b for s, b in zip(cluster.stats(), inbound_before, strict=True)
        ]
    finally:
        for client in everyone:
            if client.transport is not None:
                client.transport.close()
    # Every gateway hosts the big room; small room r is on gateway r mod G.
    big_sent = sum(big_pacer.sent)
    own = [
        big_sent + sum(n for r, n in enumerate(small_pacer.sent) if r % len(gateways) == g)
        for g in range(len(gateways))
    ]
    return RoomsRun(run, small_rooms + 1, inbound, own)


@dataclass
class LoginsRun:
    """A login storm's figures: each login's time from connect to its welcome."""

    clients: int
    rate: float
    logged_in: int
    never_in: int  # timed out, refused or dropped
    first_failure: str
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_seconds: dict[str, float]
    #: Resident memory of the process logged into, before and with the clients still in.
    rss_before: int
    rss_after: int

    @property
    def server_cpu_us_per_login(self) -> float | None:
        return server_cpu_us(self.cpu_seconds, self.logged_in)

    @property
    def bytes_per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / self.logged_in if self.logged_in else 0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["server_cpu_us_per_login"] = self.server_cpu_us_per_login
        out["kib_per_connection"] = round(self.bytes_per_connection / 1024, 2)
        return out


async def logins(
    cluster: Cluster, clients: int, rate: float, login_timeout: float = LOGIN_TIMEOUT
) -> LoginsRun:
    """``clients`` clients connecting at ``rate`` a second to the first address, each
    timed from its connect to its welcome; one without a welcome after ``login_timeout``
    seconds never got in. Bounded: the last connect is at ``clients / rate`` seconds."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    stats.recording = False
    host, port = cluster.gateways[0]
    took_us = array("Q")
    failures: list[str] = []
    pool: list[LoadClient] = []

    async def one(index: int) -> None:
        client = LoadClient(f"l{index}", stats, 1)
        pool.append(client)
        started = time.monotonic_ns()
        try:
            async with asyncio.timeout(login_timeout):
                await loop.create_connection(lambda: client, host, port)
                await client.welcomed
        except (OSError, RuntimeError, TimeoutError) as exc:
            failures.append(str(exc) or type(exc).__name__)
            return
        took_us.append((time.monotonic_ns() - started) // 1000)

    tasks: list[asyncio.Task[None]] = []
    pid = cluster.server_pid(0)
    rss_before = rss_bytes(pid) if pid else 0
    before = cluster.cpu() | {GENERATOR: self_cpu_seconds()}
    started = time.monotonic()
    try:
        for index in range(clients):
            # Paced by the clock, not by sleeps (which oversleep): no catch-up bursts
            # beyond what one late wake-up owes.
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        after = cluster.cpu() | {GENERATOR: self_cpu_seconds()}
        rss_after = rss_bytes(pid) if pid else 0
    finally:
        for task in tasks:
            task.cancel()
        for client in pool:
            if client.transport is not None:
                client.transport.close()
    latencies = sorted(took_us)
    return LoginsRun(
        clients=clients,
        rate=rate,
        logged_in=len(latencies),
        never_in=len(failures),
        first_failure=failures[0] if failures else "",
        seconds=round(elapsed, 2),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=latencies[-1] / 1000.0 if latencies else float("nan"),
        cpu_seconds={k: round(after[k] - before[k], 2) for k in before},
        rss_before=rss_before,
        rss_after=rss_after,
    )
