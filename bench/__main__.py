"""``python -m bench``: measure the chat cluster and print a table and JSON."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click

from bench import scenarios
from bench.load import LoginFailed
from bench.procs import (
    CLUSTER_NODES,
    REDIS_KINDS,
    Cluster,
    rss_bytes,
)


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


def _print_runs(runs: list[scenarios.Run]) -> None:
    header = (
        f"{'run':<9}{'clients':>8}{'msgs/s':>9}{'deliv/s':>10}{'p50 ms':>9}{'p90 ms':>9}"
        f"{'p99 ms':>9}{'max ms':>9}{'lost':>7}{'dup/ord':>8}"
    )
    click.echo(header)
    for r in runs:
        click.echo(
            f"{r.name:<9}{r.clients:>8}{r.sent / r.seconds:>9.0f}{r.deliveries_per_s:>10.0f}"
            f"{r.p50_ms:>9.2f}{r.p90_ms:>9.2f}{r.p99_ms:>9.2f}{r.max_ms:>9.1f}{r.lost:>7}"
            f"{r.duplicates_or_reordered:>8}"
        )
        click.echo(f"{'':<9}cpu: {_cpu_line(r.cpu_seconds)}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument(
    "workload", type=click.Choice(["fixed", "saturation", "idle", "rooms", "flood", "all"])
)
@click.option("--gateways", default=3, help="Gateways to start (with their own Redis).")
@click.option(
    "--redis",
    "redis_kind",
    default="one",
    type=click.Choice(REDIS_KINDS),
    help=f"Redis to start: one redis-server, or a Redis Cluster of {CLUSTER_NODES} primaries "
    f"(gateway n on node n mod {CLUSTER_NODES}, each node's CPU listed as redis N).",
)
@click.option("--clients", default=None, type=int, help="Clients (fixed: 300, saturation: 100).")
@click.option("--senders", default=None, type=int, help="Senders (fixed: 30, saturation: 10).")
@click.option("--rate", default=10.0, help="fixed: messages a second per sender.")
@click.option("--duration", default=10.0, help="fixed: seconds of sending.")
@click.option("--start-rate", default=200.0, help="saturation: first rate per sender.")
@click.option("--factor", default=1.5, help="saturation: rate multiplier per step.")
@click.option("--steps", default=10, help="saturation: most steps.")
@click.option("--step-seconds", default=5.0, help="saturation: seconds per step.")
@click.option("--connections", default=10_000, help="idle: connections on one gateway.")
@click.option("--rooms", "small_rooms", default=300, help="rooms: small rooms.")
@click.option("--room-size", default=10, help="rooms: members of each small room.")
@click.option("--big-room", default=300, help="rooms: members of the one big room.")
@click.option("--json", "json_path", default=None, help="Also write the figures to this file.")
def main(
    workload: str, gateways: int, redis_kind: str, clients: int | None, senders: int | None,
    rate: float, duration: float, start_rate: float, factor: float, steps: int,
    step_seconds: float, connections: int, small_rooms: int, room_size: int, big_room: int,
    json_path: str | None,
) -> None:  # fmt: skip
    """Start a redis-server (or a Redis Cluster) and GATEWAYS chat gateways on loopback,
    drive them with a load generator, and print latency, throughput, loss and the CPU
    split."""
    _raise_fd_limit()
    run, loop_name = _loop_runner()
    results: dict[str, Any] = {"loop": loop_name, "gateways": gateways}
    if redis_kind == "one":
        click.echo(f"bench: {gateways} gateway(s), one redis-server, generator on {loop_name}")
    else:
        results["redis"] = redis_kind
        click.echo(
            f"bench: {gateways} gateway(s), a Redis Cluster of {CLUSTER_NODES} primaries, "
            f"generator on {loop_name}"
        )

    def start(flags: tuple[str, ...] = ()) -> Cluster:
        return Cluster.start(gateways, flags=flags, redis=redis_kind)

    async def go() -> None:
        if workload in ("fixed", "all"):
            cluster = start()
            try:
                r = await scenarios.fixed(cluster, clients or 300, senders or 30, rate, duration)
            finally:
                cluster.stop()
            click.echo("\nfixed rate")
            _print_runs([r])
            results["fixed"] = r.as_dict()
        if workload in ("saturation", "all"):
            cluster = start()
            try:
                runs, best = await scenarios.saturation(
                    cluster, clients or 100, senders or 10, start_rate, factor, steps,
                    step_seconds,
                )  # fmt: skip
            finally:
                cluster.stop()
            click.echo("\nsaturation")
            _print_runs(runs)
            sustained = round(best.deliveries_per_s) if best else 0
            click.echo(f"highest sustainable: {sustained} deliveries/s")
            results["saturation"] = {
                "steps": [r.as_dict() for r in runs],
                "sustainable_deliveries_per_s": sustained,
            }
        if workload in ("flood", "all"):
            # Flood control on (at twice the senders' rate), the fixed load with and
            # without one client flooding the first gateway.
            flags = ("--rate-limit", str(2 * rate), "--rate-burst", str(int(4 * rate)))
            runs = []
            rss = []
            for flooded in (False, True):
                cluster = start(flags)
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
        if workload in ("rooms", "all"):
            cluster = start()
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
                click.echo(
                    f"{'':<9}gateway {g + 1}: {got} bus messages in, its rooms carried {own}"
                )
            results["rooms"] = r_rooms.as_dict()
        if workload in ("idle", "all"):
            cluster = start()
            try:
                r_idle = await scenarios.idle(cluster, connections)
            except LoginFailed as exc:
                click.echo(f"\nidle: failed: {exc}")
                results["idle"] = {"connections": connections, "failed": str(exc)}
                return
            finally:
                cluster.stop()
            click.echo(
                f"\nidle: {r_idle.connections} connections registered in "
                f"{r_idle.seconds_to_register:.1f}s; gateway RSS "
                f"{r_idle.rss_before / 2**20:.1f} -> {r_idle.rss_after / 2**20:.1f} MiB, "
                f"{r_idle.bytes_per_connection / 1024:.2f} KiB per connection"
            )
            results["idle"] = r_idle.as_dict()

    try:
        run(go())
    except LoginFailed as exc:
        raise SystemExit(f"bench: {exc}") from None
    click.echo("\n" + json.dumps(results, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
