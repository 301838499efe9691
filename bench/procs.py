"""The processes a benchmark runs against: its own redis-server (or a 3-primary Redis
Cluster) and gateways, or the classroom server (``bench.classroom``) alone; and what they
cost (CPU seconds, resident memory) read from /proc."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BIN = Path(sys.executable).parent
#: Where ``bench`` is importable from (it is not installed): the project's root.
ROOT = Path(__file__).resolve().parent.parent

#: Gateway flags for load: flood control and per-address limits exist to stop abuse, and
#: every benchmark client comes from 127.0.0.1.
LOAD_FLAGS = (
    "--rate-limit", "0", "--max-per-address", "0", "--max-clients", "0",
    "--log-level", "warning",
)  # fmt: skip
#: Join history is noise for the message workloads; the login storm keeps it.
NO_HISTORY = ("--history", "0")

#: What a run can be measured against: our gateways (on Redis), or the classroom server.
TARGETS = ("gateways", "classroom")

#: Primaries of the Redis Cluster that ``--redis cluster`` starts (no replicas).
CLUSTER_NODES = 3
#: Redis deployments the benchmark can start: one redis-server, or a Redis Cluster.
REDIS_KINDS = ("one", "cluster")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Cluster:
    """A redis-server (or a Redis Cluster's nodes) and gateways started for the run (or
    addresses of running ones); or, with ``target="classroom"``, the classroom server,
    whose one address is ``gateways[0]``. Every process in ``pids`` is the server side:
    its CPU is what a delivery costs the service."""

    gateways: list[tuple[str, int]]
    pids: dict[str, int] = field(default_factory=dict)  # label -> pid, for CPU accounting
    #: Each gateway's health port, where ``GET /stats`` answers its counters.
    health_ports: list[int] = field(default_factory=list)
    #: One of :data:`TARGETS`.
    target: str = "gateways"
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _dir: str = ""

    @classmethod
    def start(
        cls,
        count: int,
        timeout: float = 30.0,
        flags: tuple[str, ...] = (),
        redis: str = "one",
        history: bool = False,
    ) -> Cluster:
        """``count`` gateways on a new redis-server (``redis="one"``) or on a new 3-primary
        Redis Cluster (``redis="cluster"``: gateway n on node n mod 3), with
        :data:`LOAD_FLAGS` (and :data:`NO_HISTORY` unless ``history``) then ``flags`` (a
        later flag overrides an earlier one)."""
        if redis not in REDIS_KINDS:
            raise ValueError(f"redis must be one of {REDIS_KINDS}, not {redis!r}")
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("bench: redis-server is not installed (apt-get install redis-server)")
        workdir = tempfile.mkdtemp(prefix="chat-bench-")
        cluster = cls([], _dir=workdir)
        try:
            if redis == "cluster":
                urls = cluster._start_redis_cluster(server, workdir, timeout)
            else:
                urls = [cluster._start_redis(server, workdir, timeout)]
            load = LOAD_FLAGS if history else LOAD_FLAGS + NO_HISTORY
            cluster._start_gateways(count, urls, workdir, timeout, load + flags)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def start_classroom(cls, timeout: float = 30.0, nodelay: bool = False) -> Cluster:
        """The classroom server (``python -m bench.classroom``) on a free loopback port,
        labelled ``classroom`` (with ``nodelay``: Nagle's algorithm off)."""
        workdir = tempfile.mkdtemp(prefix="chat-bench-")
        cluster = cls([], target="classroom", _dir=workdir)
        try:
            port = free_port()
            log = open(Path(workdir) / "classroom.log", "wb")  # noqa: SIM115
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.classroom", "--host", "127.0.0.1",
                 "--port", str(port), *(["--nodelay"] if nodelay else [])],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
            cluster._procs.append(proc)
            cluster.pids["classroom"] = proc.pid
            cluster.gateways.append(("127.0.0.1", port))
            _wait_port(port, timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def server_pid(self, index: int = 0) -> int | None:
        """The pid of the process that serves ``gateways[index]`` (None: not ours)."""
        label = "classroom" if self.target == "classroom" else f"gateway {index + 1}"
        return self.pids.get(label)

    def _start_redis(self, server: str, workdir: str, timeout: float) -> str:
        """One redis-server, labelled ``redis``; returns its URL."""
        port = free_port()
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._procs.append(proc)
        self.pids["redis"] = proc.pid
        _wait_port(port, timeout)
        return f"redis://127.0.0.1:{port}/0"

    def _start_redis_cluster(self, server: str, workdir: str, timeout: float) -> list[str]:
        """A Redis Cluster of :data:`CLUSTER_NODES` primaries, each redis-server in its own
        directory, labelled ``redis 1``..``redis 3``; made by ``redis-cli --cluster create``
        and waited for until every node says ``cluster_state:ok``. Returns the nodes' URLs."""
        cli = shutil.which("redis-cli")
        if cli is None:
            raise SystemExit("bench: redis-cli is not installed (apt-get install redis-tools)")
        ports = []
        for n in range(CLUSTER_NODES):
            port, bus_port = free_port(), free_port()
            node_dir = Path(workdir) / f"redis-{n + 1}"
            node_dir.mkdir()
            log = open(node_dir / "redis.log", "wb")  # noqa: SIM115
            proc = subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(node_dir), "--loglevel", "warning",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "5000", "--cluster-port", str(bus_port)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            self._procs.append(proc)
            self.pids[f"redis {n + 1}"] = proc.pid
            ports.append(port)
        for port in ports:
            _wait_port(port, timeout)
        try:
            made = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                 "--cluster-yes"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise SystemExit(
                f"bench: redis-cli --cluster create took over {timeout:.0f}s"
            ) from None
        if made.returncode != 0:
            out = (made.stdout + made.stderr).decode(errors="replace")
            raise SystemExit(f"bench: redis-cli --cluster create failed:\n{out}")
        deadline = time.monotonic() + timeout
        for port in ports:
            while (info := _cluster_info(cli, port)).get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"bench: the Redis Cluster node on port {port} is not ok after "
                        f"{timeout:.0f}s: {info}"
                    )
                time.sleep(0.05)
        return [f"redis://127.0.0.1:{port}/0" for port in ports]

    def _start_gateways(
        self, count: int, urls: list[str], workdir: str, timeout: float, flags: tuple[str, ...]
    ) -> None:
        """``count`` gateways, gateway n (from 0) on ``urls[n % len(urls)]``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CHAT_"))}
        for n in range(count):
            gport, hport = free_port(), free_port()
            log = open(Path(workdir) / f"gw-{n + 1}.log", "wb")  # noqa: SIM115
            gw = subprocess.Popen(
                [str(BIN / "chat-gateway"), "--host", "127.0.0.1", "--port", str(gport),
                 "--redis-url", urls[n % len(urls)], "--gateway-id", f"bench-{n + 1}",
                 "--health-port", str(hport), *flags],
                stdout=subprocess.DEVNULL, stderr=log, env=env,
            )  # fmt: skip
            self._procs.append(gw)
            self.pids[f"gateway {n + 1}"] = gw.pid
            self.gateways.append(("127.0.0.1", gport))
            self.health_ports.append(hport)
        for host, gport in self.gateways:
            _wait_port(gport, timeout, host)

    def cpu(self) -> dict[str, float]:
        out = {}
        for label, pid in self.pids.items():
            try:
                out[label] = cpu_seconds(pid)
            except OSError:
                out[label] = float("nan")
        return out

    def stats(self) -> list[dict[str, int]]:
        """Each gateway's counters (``GET /stats``), in gateway order."""
        out = []
        for port in self.health_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as reply:
                out.append(json.loads(reply.read()))
        return out

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of each server process's log (warnings and errors only, at load)."""
        out = []
        for path in sorted(Path(self._dir).glob("*.log")) if self._dir else []:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out += [f"{path.stem}: {line}" for line in tail]
        return "\n".join(out)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


def _wait_port(port: int, timeout: float, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"bench: nothing listens on {host}:{port} after {timeout:.0f}s"
                ) from None
            time.sleep(0.05)


def _cluster_info(cli: str, port: int) -> dict[str, str]:
    """A Redis Cluster node's ``CLUSTER INFO`` fields (empty if it does not answer)."""
    try:
        out = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(port), "cluster", "info"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=5,
        ).stdout.decode(errors="replace")  # fmt: skip
    except subprocess.TimeoutExpired:
        return {}
    return dict(line.strip().split(":", 1) for line in out.splitlines() if ":" in line)
