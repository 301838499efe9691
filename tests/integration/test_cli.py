"""The command-line programs as operators and newcomers run them."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import Cluster
from tests.support import ChatClient, GatewayProcess, RedisServer, free_port, run_cli

pytestmark = pytest.mark.integration


async def test_embedded_mode_runs_a_chat_alone() -> None:
    """With no Redis configured the gateway says so and serves a working chat by itself."""
    gateway = GatewayProcess("solo", None)
    await gateway.start()
    try:
        assert gateway.log is not None
        assert "embedded in-process broker" in gateway.log.text()
        alice = await ChatClient.connect(gateway.port)
        bob = await ChatClient.connect(gateway.port)
        await alice.login("alice")
        await bob.login("bob")
        assert await alice.readline() == "* bob joined the chat"
        await bob.send("hi")
        assert await alice.readline() == "bob: hi"
        assert await bob.readline() == "bob: hi"
        await alice.close()
        await bob.close()
    finally:
        await gateway.stop()
    gateway.assert_no_traceback()


async def test_a_redis_on_its_unix_socket_serves_gateways_and_admin(
    redis_server: RedisServer,
) -> None:
    """A Redis on the gateways' host can be reached through its socket (a unix:// URL, as
    the README says): two gateways relay a chat through it, and chat-admin lists who is
    online. (redis-py refuses TCP keepalive on such a socket: the gateway must not ask.)"""
    gateways = [GatewayProcess(f"gw-{n}", redis_server.unix_url) for n in (1, 2)]
    await asyncio.gather(*(g.start() for g in gateways))
    try:
        alice = await ChatClient.connect(gateways[0].port)
        bob = await ChatClient.connect(gateways[1].port)
        await alice.login("alice")
        await bob.login("bob")
        assert await alice.expect("* bob joined the chat")
        await bob.send("oi")
        assert await alice.readline() == "bob: oi"
        status, out, err = await run_cli(
            "chat-admin", "--redis-url", redis_server.unix_url, "who", "--json"
        )
        assert (status, err) == (0, "")
        assert sorted(user["name"] for user in json.loads(out)) == ["alice", "bob"]
        await alice.close()
        await bob.close()
    finally:
        await asyncio.gather(*(g.stop() for g in gateways))
    for gateway in gateways:
        gateway.assert_no_traceback()


async def test_gateway_port_in_use_is_one_line_and_exit_1(cluster: Cluster) -> None:
    """A gateway that cannot bind says so in one log line and exits non-zero."""
    await cluster.start(1)
    status, _, err = await run_cli(
        "chat-gateway", "--host", "127.0.0.1", "--port", str(cluster.gateways[0].port),
        "--redis-url", cluster.redis.url,
    )  # fmt: skip
    assert status == 1
    assert "cannot listen on 127.0.0.1" in err
    assert "Traceback" not in err


async def test_gateway_id_in_use_refused(cluster: Cluster) -> None:
    """A second gateway started under a live gateway's id waits --redis-wait for the id to
    expire, then refuses to start."""
    await cluster.start(1)
    status, _, err = await run_cli(
        "chat-gateway", "--host", "127.0.0.1", "--port", "0",
        "--redis-url", cluster.redis.url, "--gateway-id", "gw-1", "--redis-wait", "1",
    )  # fmt: skip
    assert status == 1
    assert "already used by a live gateway" in err
    assert "Traceback" not in err


async def test_admin_unreachable_redis_one_line_nonzero() -> None:
    """chat-admin on an unreachable Redis: one line on stderr, exit 1, no traceback."""
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "who"
    )
    assert status == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("chat-admin: ")


async def test_admin_bad_url_one_line_nonzero() -> None:
    """A malformed Redis URL is refused in one line."""
    status, _, err = await run_cli("chat-admin", "--redis-url", "http://nope", "who")
    assert status == 1
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


async def test_admin_reads_redis_url_from_environment(cluster: Cluster) -> None:
    """Without --redis-url, chat-admin uses REDIS_URL."""
    await cluster.start(1)
    await cluster.user(0, "alice")
    import asyncio
    import os

    from tests.support import BIN, clean_env

    proc = await asyncio.create_subprocess_exec(
        str(BIN / "chat-admin"), "who", "--json",
        env=clean_env(REDIS_URL=cluster.redis.url), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert b'"alice"' in out
    assert os.environ.get("REDIS_URL") != cluster.redis.url


async def test_gateway_unreachable_redis_gives_up_with_one_line() -> None:
    """A gateway whose Redis never answers retries for --redis-wait, then exits 1 with a
    line naming the Redis (password redacted), and no traceback."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    status, _, err = await run_cli(
        "chat-gateway", "--host", "127.0.0.1", "--port", "0", "--redis-url", url,
        "--redis-wait", "1",
    )  # fmt: skip
    assert status == 1
    assert "cannot reach Redis at redis://:***@127.0.0.1" in err.splitlines()[-1]
    assert "hunter2" not in err
    assert "Traceback" not in err


async def test_unreachable_sentinels_or_a_bad_sentinel_url_give_one_line() -> None:
    """A Sentinel URL whose Sentinels never answer, or that names no service, is one line on
    stderr and exit status 1, from the gateway and from chat-admin alike."""
    port = free_port()
    unreachable = f"redis+sentinel://:hunter2@127.0.0.1:{port}/chat"
    status, _, err = await run_cli(
        "chat-gateway", "--host", "127.0.0.1", "--port", "0", "--redis-url", unreachable,
        "--redis-wait", "1",
    )  # fmt: skip
    assert status == 1
    last = err.splitlines()[-1]
    assert f"cannot reach Redis service 'chat' through Sentinel at 127.0.0.1:{port}" in last
    assert last.endswith("No master found for 'chat' (no Sentinel answered with one)"), last
    assert "hunter2" not in err
    assert "Traceback" not in err
    status, _, err = await run_cli("chat-admin", "--redis-url", unreachable, "who")
    assert status == 1
    assert err.startswith("chat-admin: ") and len(err.splitlines()) == 1, err
    for program in ("chat-gateway", "chat-admin"):
        status, _, err = await run_cli(
            program, "--redis-url", f"redis+sentinel://127.0.0.1:{port}", *(
                ("--port", "0", "--redis-wait", "1") if program == "chat-gateway" else ("who",)
            )
        )  # fmt: skip
        assert status == 1
        assert "expected /SERVICE or /SERVICE/DB" in err.splitlines()[-1], err
        assert "Traceback" not in err
