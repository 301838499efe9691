"""``python -m bench``: measure the chat cluster (with --compare, the classroom design too)
and print a table and JSON."""

from __future__ import annotations

import asyncio
import json
import math
import resource
import shlex
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click

from bench import plot, scenarios
from bench.load import LoginFailed
from bench.procs import (
    CLUSTER_NODES,
    REDIS_KINDS,
    TARGETS,
    Cluster,
    rss_bytes,
)

WORKLOADS = ("fixed", "saturation", "idle", "rooms", "flood", "logins")
#: Seconds the classroom server gets to register the idle workload's clients.
IDLE_CLASSROOM_BUDGET = 60.0


def _loop_runner() -> tuple[Callable[[Coroutine[Any, Any, Any]], Any], str]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run, "asyncio"
    return uvloop.run, "uvloop"


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu_line(cpu: dict[str, float]) -> str:
    line = "  ".join(f"{k} {v:.1f}s" for k, v in cpu.items())
    nodes = [v for k, v in cpu.items() if k.startswith("redis ")]
    if len(nodes) > 1:  # a Redis Cluster: each node above, and their sum
        line += f"  (redis total {sum(nodes):.1f}s)"
    return line


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _print_runs(runs: list[scenarios.Run], targets: list[str] | None = None) -> None:
    """A row per run; with ``targets`` (comparing), each row names its target first."""
    lead = f"{'target':<10}" if targets else ""
    header = (
        f"{lead}{'run':<9}{'clients':>8}{'msgs/s':>9}{'deliv/s':>10}{'p50 ms':>9}"
        f"{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'lost':>7}{'dup/ord':>8}{'srv µs/dl':>10}"
        f"{'all µs/dl':>10}"
    )
    click.echo(header)
    for n, r in enumerate(runs):
        lead = f"{targets[n]:<10}" if targets else ""
        click.echo(
            f"{lead}{r.name:<9}{r.clients:>8}{r.sent / r.seconds:>9.0f}"
            f"{r.deliveries_per_s:>10.0f}{r.p50_ms:>9.2f}{r.p90_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{r.max_ms:>9.1f}{r.lost:>7}{r.duplicates_or_reordered:>8}"
            f"{_us(r.server_cpu_us_per_delivery):>10}{_us(r.all_cpu_us_per_delivery):>10}"
        )
        bound = (
            f"  (generator-bound: {r.generator_load:.0%} of its cores)" if r.generator_bound else ""
        )
        click.echo(f"{'':<{len(lead) + 9}}cpu: {_cpu_line(r.cpu_seconds)}{bound}")


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    """``theirs / ours`` (the classroom's figure over the gateways'), None if undefined."""
    if ours is None or theirs is None or not ours or math.isnan(ours) or math.isnan(theirs):
        return None
    return round(theirs / ours, 2)


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"x{ratio:g}"


def _compare(ours: scenarios.Run, theirs: scenarios.Run) -> dict[str, float | None]:
    """The classroom's figures over the gateways': above 1, the classroom pays more."""
    ratios = {
        "p99": _ratio(ours.p99_ms, theirs.p99_ms),
        "server_cpu_us_per_delivery": _ratio(
            ours.server_cpu_us_per_delivery, theirs.server_cpu_us_per_delivery
        ),
        "all_cpu_us_per_delivery": _ratio(
            ours.all_cpu_us_per_delivery, theirs.all_cpu_us_per_delivery
        ),
    }
    click.echo(
        f"classroom / gateways, {ours.name}: p99 {_times(ratios['p99'])}, server CPU per "
        f"delivery {_times(ratios['server_cpu_us_per_delivery'])}, all CPU per delivery "
        f"(generator included) {_times(ratios['all_cpu_us_per_delivery'])}"
    )
    return ratios


def _print_logins(runs: list[scenarios.LoginsRun], targets: list[str]) -> None:
    click.echo(
        f"{'target':<10}{'clients':>8}{'in':>7}{'never':>7}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'max ms':>10}{'seconds':>9}{'srv µs/login':>13}{'KiB/conn':>10}"
    )
    for target, r in zip(targets, runs, strict=True):
        click.echo(
            f"{target:<10}{r.clients:>8}{r.logged_in:>7}{r.never_in:>7}{r.p50_ms:>10.1f}"
            f"{r.p99_ms:>10.1f}{r.max_ms:>10.1f}{r.seconds:>9.1f}"
            f"{_us(r.server_cpu_us_per_login):>13}{r.bytes_per_connection / 1024:>10.2f}"
        )
        click.echo(f"{'':<10}cpu: {_cpu_line(r.cpu_seconds)}")
        if r.first_failure:
            click.echo(f"{'':<10}first failure: {r.first_failure}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("workload", type=click.Choice([*WORKLOADS, "all"]))
@click.option("--gateways", default=3, help="Gateways to start (with their own Redis).")
@click.option(
    "--redis",
    "redis_kind",
    default="one",
    type=click.Choice(REDIS_KINDS),
    help=f"Redis to start: one redis-server, or a Redis Cluster of {CLUSTER_NODES} primaries "
    f"(gateway n on node n mod {CLUSTER_NODES}, each node's CPU listed as redis N).",
)
@click.option(
    "--compare",
    is_flag=True,
    help="Run each workload against the gateways and then against the classroom server "
    "(python -m bench.classroom: one process, a thread per client), and print the ratios. "
    "rooms and flood have no classroom counterpart and run against the gateways only.",
)
@click.option(
    "--classroom-nodelay",
    is_flag=True,
    help="--compare: start the classroom server with Nagle's algorithm off (TCP_NODELAY, as "
    "the gateways have it); the classic code leaves it on, which delays small writes.",
)
@click.option(
    "--gateway-args",
    default="",
    help="More chat-gateway flags, as one string (e.g. '--notice-limit 0'), after the "
    "benchmark's own: to measure a setting against its default.",
)
@click.option("--clients", default=None, type=int, help="Clients (fixed: 300, saturation: 100).")
@click.option("--senders", default=None, type=int, help="Senders (fixed: 30, saturation: 10).")
@click.option("--rate", default=10.0, help="fixed: messages a second per sender.")
@click.option("--duration", default=10.0, help="fixed: seconds of sending.")
@click.option("--start-rate", default=200.0, help="saturation: first rate per sender.")
@click.option("--factor", default=1.5, help="saturation: rate multiplier per step.")
@click.option("--steps", default=10, help="saturation: most steps.")
@click.option("--step-seconds", default=5.0, help="saturation: seconds per step.")
@click.option(
    "--generators",
    default=1,
    type=click.IntRange(1, 16),
    help="saturation: load generator processes, each with a share of the clients (one "
    "reads about a million deliveries a second at most; past that the run measures it).",
)
@click.option(
    "--check-every",
    default=1,
    type=click.IntRange(1),
    help="saturation: 1 in N clients checks order and measures latency; the others only "
    "count their lines (every delivery still counted), for a generator several times "
    "cheaper per delivery.",
)
@click.option("--connections", default=10_000, help="idle: connections on one gateway.")
@click.option("--rooms", "small_rooms", default=300, help="rooms: small rooms.")
@click.option("--room-size", default=10, help="rooms: members of each small room.")
@click.option("--big-room", default=300, help="rooms: members of the one big room.")
@click.option("--logins", "login_count", default=5_000, help="logins: clients logging in.")
@click.option("--login-rate", default=500.0, help="logins: connections a second.")
@click.option(
    "--login-timeout",
    default=scenarios.LOGIN_TIMEOUT,
    help="logins: seconds a client waits for its welcome before it counts as never in.",
)
@click.option("--json", "json_path", default=None, help="Also write the figures to this file.")
@click.option(
    "--plot",
    "plot_path",
    default=None,
    help="Also draw the saturation run (latency p50/p90/p99 and server CPU per delivery "
    "per step) into this PNG file; needs matplotlib (the bench extra).",
)
def main(
    workload: str, gateways: int, redis_kind: str, compare: bool, classroom_nodelay: bool,
    gateway_args: str, clients: int | None,
    senders: int | None, rate: float, duration: float, start_rate: float, factor: float,
    steps: int, step_seconds: float, generators: int, check_every: int, connections: int,
    small_rooms: int,
    room_size: int, big_room: int, login_count: int, login_rate: float, login_timeout: float,
    json_path: str | None, plot_path: str | None,
) -> None:  # fmt: skip
    """Start a redis-server (or a Redis Cluster) and GATEWAYS chat gateways on loopback,
    drive them with a load generator, and print latency, throughput, loss and the CPU
    split; with --compare, the same against the classroom server, and the ratios."""
    if plot_path:
        if workload not in ("saturation", "all"):
            raise click.UsageError("--plot draws the saturation run: use saturation or all")
        plot.require()
    _raise_fd_limit()
    run, loop_name = _loop_runner()
    targets = list(TARGETS) if compare else ["gateways"]
    results: dict[str, Any] = {"loop": loop_name, "gateways": gateways}
    if gateway_args:
        results["gateway_args"] = gateway_args
    classroom: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    if redis_kind == "one":
        click.echo(f"bench: {gateways} gateway(s), one redis-server, generator on {loop_name}")
    else:
        results["redis"] = redis_kind
        click.echo(
            f"bench: {gateways} gateway(s), a Redis Cluster of {CLUSTER_NODES} primaries, "
            f"generator on {loop_name}"
        )
    if compare:
        results["classroom_nodelay"] = classroom_nodelay
        click.echo(
            "bench: each workload also against the classroom server (one process, a thread "
            f"per client, Nagle {'off' if classroom_nodelay else 'on'}); ratios are "
            "classroom / gateways"
        )

    def start(target: str, flags: tuple[str, ...] = (), history: bool = False) -> Cluster:
        if target == "classroom":
            return Cluster.start_classroom(nodelay=classroom_nodelay)
        extra = tuple(shlex.split(gateway_args))
        return Cluster.start(gateways, flags=flags + extra, redis=redis_kind, history=history)

    def put(target: str, name: str, value: Any) -> None:
        (classroom if target == "classroom" else results)[name] = value

    def skipped(name: str, why: str) -> None:
        if compare:
            click.echo(f"{name}: skipped for the classroom server ({why})")
            classroom[name] = {"skipped": why}

    async def go() -> None:
        if workload in ("fixed", "all"):
            fixed_runs = []
            for target in targets:
                cluster = start(target)
                try:
                    fixed_runs.append(await scenarios.fixed(
                        cluster, clients or 300, senders or 30, rate, duration,
                    ))  # fmt: skip
                finally:
                    cluster.stop()
                put(target, "fixed", fixed_runs[-1].as_dict())
            click.echo("\nfixed rate")
            _print_runs(fixed_runs, targets if compare else None)
            if compare:
                ratios["fixed"] = _compare(*fixed_runs)
        if workload in ("saturation", "all"):
            await saturation()
        if workload in ("flood", "all"):
            await flood()
            skipped("flood", "no rooms and no flood control: the flooder has nowhere to go")
        if workload in ("rooms", "all"):
            await many_rooms()
            skipped("rooms", "it has no rooms")
        if workload in ("logins", "all"):
            login_runs = []
            for target in targets:
                cluster = start(target, history=True)  # the gateway's default history
                try:
                    login_runs.append(
                        await scenarios.logins(cluster, login_count, login_rate, login_timeout)
                    )
                finally:
                    cluster.stop()
                put(target, "logins", login_runs[-1].as_dict())
            click.echo(
                f"\nlogins: {login_count} clients at {login_rate:g}/s on one server, "
                f"timed from connect to welcome (never in: no welcome within {login_timeout:g}s)"
            )
            _print_logins(login_runs, targets)
            if compare:
                ours, theirs = login_runs
                ratios["logins"] = {
                    "p99": _ratio(ours.p99_ms, theirs.p99_ms),
                    "server_cpu_us_per_login": _ratio(
                        ours.server_cpu_us_per_login, theirs.server_cpu_us_per_login
                    ),
                }
                click.echo(
                    f"classroom / gateways, logins: p99 {_times(ratios['logins']['p99'])}, "
                    "server CPU per login "
                    f"{_times(ratios['logins']['server_cpu_us_per_login'])}"
                )
        if workload in ("idle", "all"):
            for target in targets:
                await idle(target)

    async def saturation() -> None:
        best_rates: list[int] = []
        limited: list[bool] = []
        all_runs: list[scenarios.Run] = []
        row_targets: list[str] = []
        by_target: dict[str, list[scenarios.Run]] = {}
        for target in targets:
            cluster = start(target)
            try:
                runs, best = await scenarios.saturation(
                    cluster, clients or 100, senders or 10, start_rate, factor, steps,
                    step_seconds, generators=generators, check_every=check_every,
                )  # fmt: skip
            finally:
                cluster.stop()
            sustained = round(best.deliveries_per_s) if best else 0
            best_rates.append(sustained)
            limited.append(scenarios.limited_by_generator(runs, best))
            by_target[target] = runs
            all_runs += runs
            row_targets += [target] * len(runs)
            put(target, "saturation", {
                "steps": [r.as_dict() for r in runs],
                "sustainable_deliveries_per_s": sustained,
                "limited_by_generator": limited[-1],
            })  # fmt: skip
        click.echo("\nsaturation")
        if check_every > 1:
            click.echo(
                f"(p50/p90/p99/max and dup/ord from 1 client in {check_every}; every "
                "delivery counted)"
            )
        _print_runs(all_runs, row_targets if compare else None)
        for target, sustained, by_generator in zip(targets, best_rates, limited, strict=True):
            who = f" ({target})" if compare else ""
            why = (
                " (the load generator's limit, not the server's: see --generators, --check-every)"
                if by_generator
                else ""
            )
            click.echo(f"highest sustainable{who}: {sustained} deliveries/s{why}")
        if compare:
            ratios["saturation"] = {
                "sustainable_deliveries_per_s": _ratio(best_rates[0], best_rates[1]),
                # Both true: the two rates are the generator's, whatever the ratio says.
                "limited_by_generator": limited,
                # Step by step as far as both went (one may have stopped sooner).
                "steps": [
                    _compare(ours, theirs)
                    for ours, theirs in zip(
                        by_target["gateways"], by_target["classroom"], strict=False
                    )
                ],
            }
        if plot_path:
            plot.saturation_png(
                {t: [r.as_dict() for r in runs] for t, runs in by_target.items()}, plot_path
            )
            click.echo(f"saturation plot: {plot_path}")

    async def flood() -> None:
        # Flood control on (at twice the senders' rate), the fixed load with and
        # without one client flooding the first gateway.
        flags = ("--rate-limit", str(2 * rate), "--rate-burst", str(int(4 * rate)))
        runs = []
        rss = []
        for flooded in (False, True):
            cluster = start("gateways", flags)
            try:
                pid = cluster.pids["gateway 1"]
                before = rss_bytes(pid)
                runs.append(await scenarios.fixed(
                    cluster, clients or 300, senders or 30, rate, duration, flooded,
                ))  # fmt: skip
                rss.append(rss_bytes(pid) - before)
            finally:
                cluster.stop()
        click.echo("\nfixed load, without and with a flooder on gateway 1")
        _print_runs(runs)
        click.echo(
            f"{'':<9}gateway 1 RSS growth: {rss[0] / 2**10:.0f} KiB without, "
            f"{rss[1] / 2**10:.0f} KiB with the flooder"
        )
        results["flood"] = {
            "runs": [r.as_dict() for r in runs],
            "gateway_1_rss_growth_bytes": rss,
        }

    async def many_rooms() -> None:
        cluster = start("gateways")
        try:
            r_rooms = await scenarios.rooms(
                cluster, small_rooms, room_size, big_room, senders or 30, rate, 1.0,
                duration,
            )  # fmt: skip
        finally:
            cluster.stop()
        click.echo(f"\nrooms: {r_rooms.rooms} rooms")
        _print_runs([r_rooms.run])
        for g, (got, own) in enumerate(zip(r_rooms.inbound, r_rooms.own_traffic, strict=True)):
            click.echo(f"{'':<9}gateway {g + 1}: {got} bus messages in, its rooms carried {own}")
        results["rooms"] = r_rooms.as_dict()

    async def idle(target: str) -> None:
        # The classroom design cannot register 10,000 clients in any sensible time (each
        # join is a line to everyone, under one lock): it gets a budget, and the figures
        # are of the clients that got in.
        budget = IDLE_CLASSROOM_BUDGET if target == "classroom" else None
        server = "classroom server" if target == "classroom" else "gateway"
        cluster = start(target)
        try:
            r_idle = await scenarios.idle(cluster, connections, budget)
        except LoginFailed as exc:
            click.echo(f"\nidle: failed: {exc}")
            put(target, "idle", {"connections": connections, "failed": str(exc)})
            return
        finally:
            cluster.stop()
        missing = (
            f" ({r_idle.not_registered} of {connections} not registered within the "
            f"{budget:g}s budget)"
            if r_idle.not_registered
            else ""
        )
        click.echo(
            f"\nidle{f' ({target})' if compare else ''}: {r_idle.connections} connections "
            f"registered in {r_idle.seconds_to_register:.1f}s{missing}; {server} RSS "
            f"{r_idle.rss_before / 2**20:.1f} -> {r_idle.rss_after / 2**20:.1f} MiB, "
            f"{r_idle.bytes_per_connection / 1024:.2f} KiB per connection; every server "
            f"process (gateways and Redis, or the classroom server) "
            f"{r_idle.server_bytes_per_connection / 1024:.2f} KiB per connection"
        )
        put(target, "idle", r_idle.as_dict())

    try:
        run(go())
    except LoginFailed as exc:
        raise SystemExit(f"bench: {exc}") from None
    if compare:
        results["classroom"] = classroom
        results["classroom_vs_gateways"] = ratios
    click.echo("\n" + json.dumps(results, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
