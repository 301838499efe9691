"""The benchmark's own pieces, on a busy machine as well as a quiet one: the classroom
server really is a chat (it relays, echoes and announces), the load generator drives it
unchanged, server CPU per delivery is the sum of the server processes over deliveries,
and --plot writes a PNG."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
import threading
import time
from array import array
from asyncio import StreamReader, StreamWriter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as bench_main
from bench import load, plot, scenarios
from bench.classroom import ClassroomServer
from bench.procs import Cluster
from chatwire.texts import PROMPT, notice_line, welcome_text
from tests.support import T


@pytest.fixture
def classroom() -> Iterator[tuple[str, int]]:
    """The classroom server on a free loopback port, in a thread of this process."""
    server = ClassroomServer("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.address
    finally:
        server.close()
        thread.join(T)


class LineSocket:
    """A blocking line client: what a student's ``nc`` does, with a timeout."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=T)
        self._buffer = b""

    def line(self) -> str:
        while b"\n" not in self._buffer:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError(f"closed with {self._buffer!r} unread")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def send(self, text: str) -> None:
        self.sock.sendall(f"{text}\n".encode())

    def login(self, name: str) -> str:
        assert self.line() == "* Choose a name:"
        self.send(name)
        return self.line()

    def at_eof(self) -> bool:
        return self._buffer == b"" and self.sock.recv(1) == b""


def test_the_classroom_server_relays_to_everyone_with_echo_and_notices(
    classroom: tuple[str, int],
) -> None:
    """Welcome with the count online, a join notice to the others, every line to everyone
    as ``name: text`` (the sender too), and ``sair``: a goodbye, a leave notice, EOF."""
    ana, bruno = LineSocket(classroom), LineSocket(classroom)
    try:
        assert ana.login("ana").startswith("* Welcome, ana! 1 user online.")
        assert bruno.login("bruno").startswith("* Welcome, bruno! 2 users online.")
        assert ana.line() == "* bruno joined the chat"

        ana.send("bom dia")
        assert ana.line() == "ana: bom dia"
        assert bruno.line() == "ana: bom dia"

        ana.sock.sendall(b"one\ntwo\n")  # two lines in one write: each one named
        assert [bruno.line(), bruno.line()] == ["ana: one", "ana: two"]
        assert [ana.line(), ana.line()] == ["ana: one", "ana: two"]

        ana.send("sair")
        assert ana.line() == "* Goodbye, ana!"
        assert ana.at_eof()
        assert bruno.line() == "* ana left the chat"
    finally:
        ana.sock.close()
        bruno.sock.close()


class PreemptedLock:
    """A lock whose holder loses the CPU right after releasing it, as a thread may."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        time.sleep(0.05)


def test_who_logs_in_next_never_hears_of_the_previous_join() -> None:
    """A join is told to those already in, in the step that admits the newcomer: one who
    logs in just after never gets it, however the threads are scheduled."""
    server = ClassroomServer("127.0.0.1", 0)
    server._lock = PreemptedLock()  # type: ignore[assignment]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ana, bruno = LineSocket(server.address), LineSocket(server.address)
    try:
        ana.login("ana")
        bruno.login("bruno")
        bruno.send("oi")
        assert bruno.line() == "bruno: oi"
    finally:
        ana.sock.close()
        bruno.sock.close()
        server.close()
        thread.join(T)


def test_a_client_that_drops_is_announced_as_leaving(classroom: tuple[str, int]) -> None:
    """Closing the socket without ``sair`` is a leave too."""
    ana, bruno = LineSocket(classroom), LineSocket(classroom)
    try:
        ana.login("ana")
        bruno.login("bruno")
        assert ana.line() == "* bruno joined the chat"
        bruno.sock.close()
        assert ana.line() == "* bruno left the chat"
    finally:
        ana.sock.close()


async def test_the_load_generator_drives_the_classroom_server(
    classroom: tuple[str, int],
) -> None:
    """The fixed workload, unchanged, against the classroom server: every message reaches
    every client (the sender included), none lost or out of order."""
    run = await scenarios.fixed(Cluster([classroom]), 4, 2, 20.0, 0.5)
    assert run.sent > 0
    assert run.deliveries == run.expected_deliveries == run.sent * 4
    assert (run.lost, run.duplicates_or_reordered) == (0, 0)


@pytest.mark.parametrize("check_every", [1, 4])
async def test_the_load_generator_over_two_processes_drives_the_classroom_server(
    classroom: tuple[str, int], check_every: int
) -> None:
    """Saturation with the generator over two processes: each holds half the clients and
    senders, yet every receiver gets every sender's messages in order, none twice (a
    sender numbered twice, or a process counting another's senders, would show up as
    reordered or lost). With ``check_every``, the clients that only count still count
    every delivery."""
    runs, best = await scenarios.saturation(
        Cluster([classroom]), 6, 3, 20.0, 1.5, 2, 0.5, generators=2, check_every=check_every
    )
    assert [run.name for run in runs] == ["step 1", "step 2"]
    for run, rate in zip(runs, (20.0, 30.0), strict=True):
        assert run.sent >= 0.9 * rate * 3 * 0.5
        assert run.deliveries == run.expected_deliveries == run.sent * 6
        assert (run.lost, run.duplicates_or_reordered) == (0, 0)
        assert run.p99_ms > 0
        assert (run.generators, run.check_every) == (2, check_every)
    assert best is runs[1]


#: A chat stream as one client gets it: lines, with a join and an error between them (and
#: a "!" inside a notice, where a read may start).
STREAM = (
    b"s0: 0:1:5\n* bob joined the chat\ns1: 1:1:5\n! not delivered\ns2: 2:1:5\n"
    b"* hello, everyone!\ns0: 0:2:5\n"
)


def _pieces() -> list[list[bytes]]:
    """STREAM cut in two at every byte, and in pieces of a few sizes."""
    halves = [[STREAM[:at], STREAM[at:]] for at in range(len(STREAM) + 1)]
    sizes = [[STREAM[at : at + n] for at in range(0, len(STREAM), n)] for n in (1, 3, 7)]
    return halves + sizes


async def test_a_client_that_only_counts_counts_what_a_checking_one_reads() -> None:
    """However the stream is cut into reads, an unchecked client counts the same chat
    lines and notices as a checked one, and nothing more; it says when its target is
    reached, and measures nothing."""
    for pieces in _pieces():
        seen = {}
        for checked in (True, False):
            stats = load.Stats(target=4)
            client = load.LoadClient("c", stats, 3, checked=checked)
            client.welcomed.set_result(None)
            for piece in pieces:
                client.data_received(piece)
            seen[checked] = (stats.deliveries, stats.notices, stats.reached.is_set())
            assert len(stats.latencies_us) == (4 if checked else 0)
        assert seen[True] == seen[False] == (4, 3, True), pieces


async def test_connect_all_checks_one_client_in_n(classroom: tuple[str, int]) -> None:
    """Client 0 and every ``check_every``-th after it check what they get."""
    clients = await load.connect_all([classroom], 7, load.Stats(), 1, "c", check_every=3)
    try:
        assert [c.checked for c in clients] == [True, False, False, True, False, False, True]
    finally:
        for client in clients:
            assert client.transport is not None
            client.transport.close()


async def test_clients_come_back_spread_in_order_whichever_logged_in_first() -> None:
    """connect_all() returns client i as the one on address i mod n, even when the other
    address welcomes its clients first: a workload's first k clients, its senders, are
    spread evenly over the gateways, not piled on the quickest."""

    def server(delay: float) -> Callable[[StreamReader, StreamWriter], Awaitable[None]]:
        async def handle(reader: StreamReader, writer: StreamWriter) -> None:
            writer.write(notice_line(PROMPT))
            name = (await reader.readline()).decode().strip()
            await asyncio.sleep(delay)  # a slow server, not a synchronisation
            writer.write(notice_line(welcome_text(name, 1)))
            await reader.read()
            writer.close()

        return handle

    slow = await asyncio.start_server(server(0.3), "127.0.0.1", 0)
    quick = await asyncio.start_server(server(0.0), "127.0.0.1", 0)
    addresses = [s.sockets[0].getsockname()[:2] for s in (slow, quick)]
    clients = await load.connect_all(addresses, 4, load.Stats(), 0, "c")
    try:
        assert [c.name for c in clients] == [b"c0", b"c1", b"c2", b"c3"]
        ports = [c.transport.get_extra_info("peername")[1] for c in clients if c.transport]
        assert ports == [addresses[0][1], addresses[1][1]] * 2
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.close()
        slow.close()
        quick.close()


async def test_a_login_storm_times_each_login(classroom: tuple[str, int]) -> None:
    """Every client gets in, and each login has a time."""
    run = await scenarios.logins(Cluster([classroom]), 20, 200.0, login_timeout=T)
    assert (run.logged_in, run.never_in) == (20, 0)
    assert 0 < run.p50_ms <= run.p99_ms <= run.max_ms
    assert run.as_dict()["server_cpu_us_per_login"] == 0  # no server pid here: none counted


async def test_idle_measures_every_server_process(classroom: tuple[str, int]) -> None:
    """idle registers its clients and reads the RSS of every server process, before and
    after (here this process, which runs the classroom server's threads)."""
    cluster = Cluster([classroom])
    cluster.pids["classroom"] = os.getpid()
    run = await scenarios.idle(cluster, 50)
    assert run.connections == 50
    assert run.server_rss_before > 0 and run.server_rss_after > 0
    grown = (run.server_rss_after - run.server_rss_before) / 50 / 1024
    assert run.as_dict()["server_kib_per_connection"] == round(grown, 2)


async def test_a_login_without_a_welcome_counts_as_never_in() -> None:
    """A server that accepts connections but never welcomes anyone: each login times out
    and is counted, not fatal."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        run = await scenarios.logins(Cluster([silent.getsockname()]), 3, 100.0, 0.2)
    assert (run.logged_in, run.never_in) == (0, 3)
    assert run.first_failure == "TimeoutError"
    assert run.as_dict()["server_cpu_us_per_login"] is None


def _run(cpu: dict[str, float], deliveries: int) -> scenarios.Run:
    return scenarios.Run(
        "fixed", 10, 1, 10.0, 100, deliveries, deliveries, 1.0, 1.0, 2.0, 3.0, 4.0, 0, 0, cpu
    )


@pytest.mark.parametrize(
    ("cpu", "deliveries", "expected"),
    [
        # Every gateway and Redis count; the generator does not.
        ({"redis": 0.25, "gateway 1": 1.0, "gateway 2": 0.5, "generator": 4.0}, 250_000, 7.0),
        ({"redis 1": 0.1, "redis 2": 0.1, "redis 3": 0.3, "gateway 1": 0.5}, 1_000_000, 1.0),
        ({"classroom": 0.5, "generator": 1.0}, 100_000, 5.0),
        ({"classroom": 0.5, "generator": 1.0}, 0, None),
    ],
)
def test_server_cpu_per_delivery_is_the_servers_cpu_over_deliveries(
    cpu: dict[str, float], deliveries: int, expected: float | None
) -> None:
    run = _run(cpu, deliveries)
    assert run.server_cpu_us_per_delivery == expected
    assert run.as_dict()["server_cpu_us_per_delivery"] == expected


def _steps(p99s: list[float], cpu_us: float) -> list[dict[str, Any]]:
    return [
        {
            "offered_msgs_per_s": 2000.0 * 1.5**n,
            "clients": 100,
            "p50_ms": p99 / 4,
            "p90_ms": p99 / 2,
            "p99_ms": p99,
            "server_cpu_us_per_delivery": cpu_us,
        }
        for n, p99 in enumerate(p99s)
    ]


@pytest.mark.parametrize(
    ("cpu", "deliveries", "expected"),
    [
        ({"redis": 0.25, "gateway 1": 1.0, "gateway 2": 0.5, "generator": 4.0}, 250_000, 23.0),
        ({"classroom": 0.5, "generator": 1.0}, 100_000, 15.0),
        ({"classroom": 0.5, "generator": 1.0}, 0, None),
    ],
)
def test_all_cpu_per_delivery_counts_the_generator_too(
    cpu: dict[str, float], deliveries: int, expected: float | None
) -> None:
    """The generator's CPU counts here: on loopback it carries some of a server's sending."""
    run = _run(cpu, deliveries)
    assert run.all_cpu_us_per_delivery == expected
    assert run.as_dict()["all_cpu_us_per_delivery"] == expected


def test_comparing_gives_both_cpu_ratios_classroom_over_gateways(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A classroom run whose sending the kernel charged to the generator looks cheaper by
    server CPU than by all CPU: --compare prints and returns both ratios."""
    ours = _run({"redis": 0.1, "gateway 1": 0.9, "generator": 1.0}, 100_000)
    theirs = _run({"classroom": 0.5, "generator": 1.5}, 100_000)
    ratios = bench_main._compare(ours, theirs)
    assert ratios == {"p99": 1.0, "server_cpu_us_per_delivery": 0.5, "all_cpu_us_per_delivery": 1.0}
    out = capsys.readouterr().out
    assert "server CPU per delivery x0.5, all CPU per delivery (generator included) x1" in out


@pytest.mark.parametrize(
    ("generator_cpu", "seconds", "generators", "load", "bound"),
    [
        (4.5, 5.0, 1, 0.9, True),
        (2.0, 5.0, 1, 0.4, False),
        (4.0, 5.0, 1, 0.8, True),  # the line itself counts as bound
        (8.0, 5.0, 2, 0.8, True),  # two processes: their CPU over two cores
        (4.5, 5.0, 2, 0.45, False),
    ],
)
def test_a_run_is_generator_bound_when_the_generator_kept_its_cores_busy_sending(
    generator_cpu: float, seconds: float, generators: int, load: float, bound: bool
) -> None:
    """The generator's load is its CPU while it sent, over that time: a step that then
    waits seconds for deliveries that never come (its drain) does not dilute it."""
    cpu = {"gateway 1": 1.0, "generator": generator_cpu + 0.1}  # 0.1 s more, draining
    run = scenarios._run(
        "step 1", 10, 1, 10.0, 100, 1000, (1000, 0, array("Q", [1000])), seconds + 5.0,
        dict.fromkeys(cpu, 0.0), cpu, generators=generators, sending=(seconds, generator_cpu),
    )  # fmt: skip
    assert (run.generator_load, run.generator_bound) == (load, bound)
    assert (run.as_dict()["generator_load"], run.as_dict()["generator_bound"]) == (load, bound)


def test_a_run_without_the_generators_load_is_not_generator_bound() -> None:
    run = _run({"classroom": 1.0, "generator": 5.0}, 1000)
    assert (run.generator_load, run.generator_bound) == (None, False)


def _step(generator_cpu: float) -> scenarios.Run:
    return dataclasses.replace(
        _run({"redis": 0.2, "generator": generator_cpu}, 1000), generator_load=generator_cpu / 5
    )


def test_a_ramp_stopped_by_a_busy_generator_is_the_generators_limit() -> None:
    """The step that ended the ramp decides: a busy generator there means the server's own
    limit was never reached; a step that failed with the generator idle is the server's
    limit; a ramp that ran out of steps was stopped by neither."""
    quiet, busy = _step(1.0), _step(4.6)
    assert scenarios.limited_by_generator([quiet, busy], best=quiet)
    assert not scenarios.limited_by_generator([quiet, _step(2.0)], best=quiet)
    assert not scenarios.limited_by_generator([quiet, busy], best=busy)  # out of steps
    assert scenarios.limited_by_generator([busy], best=None)
    assert not scenarios.limited_by_generator([], best=None)


def test_a_generator_bound_step_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    bench_main._print_runs([_step(1.0), _step(4.6)])
    quiet, busy = capsys.readouterr().out.splitlines()[2::2]
    assert "generator-bound" not in quiet
    assert busy.endswith("generator 4.6s  (generator-bound: 92% of its cores)")


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    """Both targets' steps, one of them shorter and with a step without deliveries."""
    steps = {"gateways": _steps([2.0, 3.0, 9.0], 6.0), "classroom": _steps([40.0], 30.0)}
    steps["classroom"].append({**steps["classroom"][0], "server_cpu_us_per_delivery": None})
    path = tmp_path / "saturation.png"
    plot.saturation_png(steps, str(path))
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_without_matplotlib_the_plot_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as exc:
        plot.require()
    assert exc.value.code == plot.MISSING
    assert "\n" not in plot.MISSING
