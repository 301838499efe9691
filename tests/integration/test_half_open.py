"""A client whose host vanishes without closing: TCP keepalive gets it announced as left.

The vanishing host is a network namespace of the test's own, joined to this machine by a
veth pair: the client runs inside it, then the namespace's link goes down, so the
gateway's packets to it are silently lost, as when a laptop lid closes or a phone leaves
coverage. Needs root (CI runs as root); a test that cannot build its namespace fails.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Cluster
from tests.support import GatewayProcess, T

pytestmark = pytest.mark.integration

KEEPALIVE = (1, 1, 2)  # idle, interval, count: gone within 1 + 1 * 2 = 3 s


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=10)


@pytest.fixture
def vanishing_host() -> Iterator[tuple[str, str, str]]:
    """A network namespace with a veth link to this host: (namespace, host ip, its ip)."""
    tag = os.getpid() % 250 + 1
    ns, here, there = f"chat-t{tag}", f"vct{tag}a", f"vct{tag}b"
    host_ip, ns_ip = f"10.213.{tag}.1", f"10.213.{tag}.2"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        sh("ip", "link", "set", there, "netns", ns)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", here)
        sh("ip", "link", "set", here, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", there)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", there, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.fail(f"cannot build a test network namespace (root and iproute2 needed): {exc}")
    try:
        yield ns, host_ip, there
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)


# The client inside the namespace: logs in as "ghost", says so, then only waits.
CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("rb")
f.readline()
s.sendall(b"ghost\\n")
print(f.readline().decode().strip(), flush=True)
time.sleep(120)
"""


async def test_vanished_client_is_announced_within_keepalive_bound(
    cluster: Cluster, vanishing_host: tuple[str, str, str]
) -> None:
    """A client whose host goes silent is announced as left within the keepalive bound
    (idle + interval * count), though it never closed its connection."""
    ns, host_ip, link = vanishing_host
    await cluster.start(1)
    keepalive = ",".join(str(v) for v in KEEPALIVE)
    exposed = GatewayProcess("gw-net", cluster.redis.url, "--keepalive", keepalive)
    cluster.gateways.append(exposed)
    await exposed.start(host=host_ip)
    watcher = await cluster.user(0, "watcher")
    ghost = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, host_ip, str(exposed.port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert ghost.stdout is not None
        async with asyncio.timeout(T):
            welcome = await ghost.stdout.readline()
        assert welcome.startswith(b"* Welcome, ghost!"), welcome
        await watcher.expect("* ghost joined the chat")
        started = time.monotonic()
        sh("ip", "netns", "exec", ns, "ip", "link", "set", link, "down")
        bound = KEEPALIVE[0] + KEEPALIVE[1] * KEEPALIVE[2]
        await watcher.expect("* ghost left the chat", timeout=bound + 3)
        elapsed = time.monotonic() - started
        assert elapsed < bound + 3, elapsed
        assert ghost.returncode is None  # the client never closed anything: it vanished
    finally:
        ghost.kill()
        await ghost.wait()
