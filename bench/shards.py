"""The load generator over several processes (``--generators``), for the saturation run.

One generator process reads about a million deliveries a second at most (a Python line
parse per delivery), so past that rate a saturation run measures the generator, not the
servers. Here each of N processes holds a share of the clients (client i in process
i mod N, so the senders are shared out too) and its share of the senders; the parent
steps them together and pools what their receivers saw. Senders keep their numbers and
their phases over all N, so every receiver still checks every sender's order, and the
monotonic clock stamped on each message is the same in every process.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from array import array
from collections.abc import Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from bench.load import LoadClient, LoginFailed, Senders, Stats, connect_all
from bench.procs import cpu_seconds

#: Seconds a generator process gets to start and log its clients in.
START_TIMEOUT = 60.0


@dataclass
class Pooled:
    """What every process's receivers saw in one step."""

    deliveries: int
    duplicates_or_reordered: int
    latencies_us: array[int]


class Shards:
    """N generator processes, each with its share of one room's clients."""

    def __init__(self, processes: list[BaseProcess], pipes: list[Connection], sizes: list[int]):
        self._processes = processes
        self._pipes = pipes
        #: Clients in each process.
        self.sizes = sizes

    @classmethod
    async def start(
        cls, count: int, addresses: list[tuple[str, int]], clients: int, senders: int,
        prefix: str, check_every: int = 1,
    ) -> Shards:  # fmt: skip
        """Start ``count`` processes sharing ``clients`` clients (the first ``senders`` of
        them senders; every ``check_every``-th a checked one), every one logged in when
        this returns; :class:`LoginFailed` if one could not log its clients in."""
        context = multiprocessing.get_context("spawn")  # nothing of our event loop inherited
        processes: list[BaseProcess] = []
        pipes: list[Connection] = []
        sizes = [len(range(n, clients, count)) for n in range(count)]
        for n in range(count):
            ours, theirs = context.Pipe()
            indices = list(range(n, clients, count))
            process = context.Process(
                target=_main,
                args=(theirs, addresses, indices, senders, prefix, check_every),
                daemon=True,
            )
            process.start()
            theirs.close()
            processes.append(process)
            pipes.append(ours)
        shards = cls(processes, pipes, sizes)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                answers = await shards._gather([_receive(pipe) for pipe in pipes])
        except BaseException:
            shards.kill()
            raise
        failed = [answer for answer in answers if answer[0] != "ready"]
        if failed:
            shards.kill()
            raise LoginFailed(*failed[0][1:])
        return shards

    def cpu(self) -> float:
        """CPU seconds the processes have used so far."""
        return sum(cpu_seconds(p.pid) for p in self._processes if p.pid is not None)

    async def reset(self) -> None:
        """Forget what the receivers saw (every process has, when this returns)."""
        await self._ask(("reset",))

    async def send(self, rate: float, duration: float) -> int:
        """Every sender sends ``rate`` messages a second for ``duration`` seconds; returns
        how many were sent in all."""
        return sum(await self._ask(("send", rate, duration)))

    async def drain(self, sent: int, patience: float) -> Pooled:
        """Wait until every client has received all ``sent`` messages (or ``patience``
        seconds have passed), and pool what they saw."""
        answers = await self._gather(
            [
                _exchange(pipe, ("drain", sent * size, patience))
                for pipe, size in zip(self._pipes, self.sizes, strict=True)
            ]
        )
        latencies: array[int] = array("Q")
        for _, _, raw in answers:
            latencies.frombytes(raw)
        return Pooled(sum(a[0] for a in answers), sum(a[1] for a in answers), latencies)

    async def stop(self) -> None:
        """Close every client and end the processes."""
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self._ask(("stop",))
        finally:
            self.kill()

    def kill(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()
            process.join(5)
        for pipe in self._pipes:
            pipe.close()

    async def _ask(self, message: tuple[Any, ...]) -> list[Any]:
        return await self._gather([_exchange(pipe, message) for pipe in self._pipes])

    @staticmethod
    async def _gather(calls: list[Coroutine[Any, Any, Any]]) -> list[Any]:
        return list(await asyncio.gather(*calls))


async def _exchange(pipe: Connection, message: tuple[Any, ...]) -> Any:
    pipe.send(message)
    return await _receive(pipe)


async def _receive(pipe: Connection) -> Any:
    """The process's next answer; EOFError if it died."""
    return await asyncio.get_running_loop().run_in_executor(None, pipe.recv)


# -- in each generator process ------------------------------------------------------------


def _main(
    pipe: Connection, addresses: list[tuple[str, int]], indices: list[int], senders: int,
    prefix: str, check_every: int,
) -> None:  # fmt: skip
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(pipe, addresses, indices, senders, prefix, check_every))
    else:
        uvloop.run(_serve(pipe, addresses, indices, senders, prefix, check_every))


async def _serve(
    pipe: Connection, addresses: list[tuple[str, int]], indices: list[int], senders: int,
    prefix: str, check_every: int,
) -> None:  # fmt: skip
    stats = Stats()
    try:
        clients = await connect_all(
            addresses, len(indices), stats, senders, prefix, indices=indices,
            check_every=check_every,
        )  # fmt: skip
    except LoginFailed as exc:
        pipe.send(("failed", exc.failed, exc.total, exc.first))
        return
    ours = [(i, client) for i, client in zip(indices, clients, strict=True) if i < senders]
    pacer = Senders([c for _, c in ours], numbers=[i for i, _ in ours], of=senders)
    pipe.send(("ready", len(clients)))
    try:
        while True:
            command, *args = await _receive(pipe)
            if command == "reset":
                stats.reset()
                pipe.send(None)
            elif command == "send":
                pipe.send(await pacer.run(*args))
            elif command == "drain":
                pipe.send(await _drain(stats, *args))
            else:  # stop
                break
    finally:
        _close(clients)
        pipe.send(None)


async def _drain(stats: Stats, target: int, patience: float) -> tuple[int, int, bytes]:
    await stats.wait_for(target, patience)
    return stats.deliveries, stats.duplicates_or_reordered, stats.latencies_us.tobytes()


def _close(clients: list[LoadClient]) -> None:
    for client in clients:
        if client.transport is not None:
            client.transport.close()
