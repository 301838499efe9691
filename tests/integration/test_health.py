"""The gateway's health endpoint, as a load balancer or container runtime sees it."""

from __future__ import annotations

import asyncio

import pytest

from gateway.health import probe
from tests.conftest import Cluster
from tests.support import run_cli

pytestmark = pytest.mark.integration


async def test_health_follows_redis(cluster: Cluster) -> None:
    """GET /health is 200 while Redis serves the gateway and 503 once it is gone; the
    probe command exits accordingly."""
    (gateway,) = await cluster.start(1, "--health-port", "0")
    url = f"http://127.0.0.1:{gateway.health_port}/health"
    healthy, detail = await asyncio.to_thread(probe, url)
    assert healthy, detail
    assert detail.startswith("ok")
    status, out, _ = await run_cli(
        "python", "-m", "gateway.health", "--port", str(gateway.health_port)
    )
    assert status == 0, out

    assert gateway.log is not None
    await cluster.redis.stop()
    await gateway.log.wait_for("bus subscription lost")
    healthy, detail = await asyncio.to_thread(probe, url)
    assert not healthy
    assert "subscription" in detail or "Redis" in detail
    status, _, err = await run_cli(
        "python", "-m", "gateway.health", "--port", str(gateway.health_port)
    )
    assert status == 1
    assert err.strip()


async def test_health_probe_without_endpoint_fails_cleanly() -> None:
    """The probe against a port where nothing listens exits 1 with one line, no traceback."""
    from tests.support import free_port

    status, _, err = await run_cli("python", "-m", "gateway.health", "--port", str(free_port()))
    assert status == 1
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
