"""The processes a benchmark runs against: its own redis-server and gateways, or running
ones; and what they cost (CPU seconds, resident memory) read from /proc."""

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

#: Gateway flags for load: flood control and per-address limits exist to stop abuse, and
#: every benchmark client comes from 127.0.0.1; join history is noise here.
LOAD_FLAGS = (
    "--rate-limit", "0", "--max-per-address", "0", "--max-clients", "0", "--history", "0",
    "--log-level", "warning",
)  # fmt: skip


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
    """A redis-server and gateways started for the run (or addresses of running ones)."""

    gateways: list[tuple[str, int]]
    pids: dict[str, int] = field(default_factory=dict)  # label -> pid, for CPU accounting
    #: Each gateway's health port, where ``GET /stats`` answers its counters.
    health_ports: list[int] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _dir: str = ""

    @classmethod
    def start(cls, count: int, timeout: float = 30.0, flags: tuple[str, ...] = ()) -> Cluster:
        """``count`` gateways on a new redis-server, with :data:`LOAD_FLAGS` then ``flags``
        (a later flag overrides an earlier one)."""
        redis = shutil.which("redis-server")
        if redis is None:
            raise SystemExit("bench: redis-server is not installed (apt-get install redis-server)")
        workdir = tempfile.mkdtemp(prefix="chat-bench-")
        cluster = cls([], _dir=workdir)
        port = free_port()
        proc = subprocess.Popen(
            [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        cluster._procs.append(proc)
        cluster.pids["redis"] = proc.pid
        _wait_port(port, timeout)
        url = f"redis://127.0.0.1:{port}/0"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CHAT_"))}
        for n in range(count):
            gport, hport = free_port(), free_port()
            log = open(Path(workdir) / f"gw-{n + 1}.log", "wb")  # noqa: SIM115
            gw = subprocess.Popen(
                [str(BIN / "chat-gateway"), "--host", "127.0.0.1", "--port", str(gport),
                 "--redis-url", url, "--gateway-id", f"bench-{n + 1}",
                 "--health-port", str(hport), *LOAD_FLAGS, *flags],
                stdout=subprocess.DEVNULL, stderr=log, env=env,
            )  # fmt: skip
            cluster._procs.append(gw)
            cluster.pids[f"gateway {n + 1}"] = gw.pid
            cluster.gateways.append(("127.0.0.1", gport))
            cluster.health_ports.append(hport)
        for host, gport in cluster.gateways:
            _wait_port(gport, timeout, host)
        return cluster

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
        """The last lines of each gateway's log (warnings and errors only, at load)."""
        out = []
        for path in sorted(Path(self._dir).glob("gw-*.log")) if self._dir else []:
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
