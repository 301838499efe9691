from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker import keys
from chatwire.names import name_key
from tests.support import ChatClient, GatewayProcess, RedisServer, T, WsClient
from tests.tls_support import Certificates
from tests.topologies import ClusterFixture


class Cluster:
    """Real gateways on one real Redis (or a Redis Cluster, each gateway pointed at another
    node), and the clients a test opened on them."""

    def __init__(self, redis: RedisServer | ClusterFixture) -> None:
        self.redis = redis
        self.gateways: list[GatewayProcess] = []
        self.clients: list[ChatClient] = []
        self.web_clients: list[WsClient] = []

    async def start(self, count: int = 3, *extra: str) -> list[GatewayProcess]:
        urls = self.redis.urls
        first = len(self.gateways)
        new = [
            GatewayProcess(f"gw-{first + i + 1}", urls[(first + i) % len(urls)], *extra)
            for i in range(count)
        ]
        self.gateways += new
        await asyncio.gather(*(g.start() for g in new))
        return new

    async def connect(self, gateway: int, **kwargs: int) -> ChatClient:
        client = await ChatClient.connect(self.gateways[gateway].port, **kwargs)
        self.clients.append(client)
        return client

    async def user(self, gateway: int, name: str) -> ChatClient:
        """A client logged in as ``name`` on gateway number ``gateway`` (0-based)."""
        client = await self.connect(gateway)
        await client.login(name)
        return client

    async def web(self, gateway: int, **kwargs: Any) -> WsClient:
        """A WebSocket client of gateway number ``gateway``'s web port (``--web-port``)."""
        port = self.gateways[gateway].web_port
        assert port, "that gateway was started without --web-port"
        client = await WsClient.connect(port, **kwargs)
        self.web_clients.append(client)
        return client

    async def web_user(self, gateway: int, name: str, **kwargs: Any) -> WsClient:
        """A WebSocket client logged in as ``name`` on gateway number ``gateway``."""
        client = await self.web(gateway, **kwargs)
        await client.login(name)
        return client

    async def name_free(self, name: str) -> None:
        """Wait until nobody holds ``name``. A leaving user's leave is announced first and
        the name freed by the next Redis call (so nobody takes it before its holder is
        seen go): a test that logs in again under it right after the leave waits for
        this. Woken by Redis's keyspace events on the presence hash, checked after each."""
        assert isinstance(self.redis, RedisServer), "one Redis only"
        client = aioredis.Redis.from_url(self.redis.url)
        pubsub = client.pubsub()
        try:
            await client.config_set("notify-keyspace-events", "Kh")
            await pubsub.subscribe(f"__keyspace@0__:{keys.ONLINE}")
            async with asyncio.timeout(T):
                while await client.hexists(keys.ONLINE, name_key(name)):
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=T)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.web_clients))
        await asyncio.gather(*(c.close() for c in self.clients))
        await asyncio.gather(*(g.stop() for g in self.gateways))
        for gateway in self.gateways:
            gateway.assert_no_traceback()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def cluster(redis_server: RedisServer) -> AsyncIterator[Cluster]:
    c = Cluster(redis_server)
    yield c
    await c.close()


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    """A CA of the test's own and a certificate for loopback, on disk for gateways."""
    certificates = Certificates(tmp_path / "ca-1")
    certificates.issue(common_name="first")
    return certificates
