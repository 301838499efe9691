"""TLS with real processes: chat-gateway with --tls-port beside its plain port, chat-client
--tls, a raw TLS line client, and a throwaway CA made by each test (trustme)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import ssl
from pathlib import Path

import pytest
import websockets.asyncio.client

from tests.conftest import Cluster
from tests.support import (
    BIN,
    ChatClient,
    GatewayProcess,
    T,
    clean_env,
    flood_past,
    free_port,
    run_cli,
)
from tests.tls_support import Certificates, common_name

pytestmark = pytest.mark.integration

RESTART_NOTICE = "* Server restarting: please reconnect."


async def tls_user(cluster: Cluster, port: int, name: str, context: ssl.SSLContext) -> ChatClient:
    """A raw TLS line client (as `openssl s_client` would be) logged in as ``name``."""
    client = await ChatClient.connect(port, tls=context)
    cluster.clients.append(client)
    await client.login(name)
    return client


def log_of(gateway: GatewayProcess) -> str:
    assert gateway.log is not None
    return gateway.log.text()


async def test_tls_and_plain_clients_share_a_room_across_gateways(
    cluster: Cluster, certs: Certificates
) -> None:
    """A TLS client on one gateway's TLS port and a plain one on another gateway's plain
    port are in the same room both ways; a drain tells the TLS client to reconnect like
    anyone, and its leave reaches the other gateway."""
    gw1, _gw2 = await cluster.start(2, *certs.gateway_args())
    assert gw1.tls_port not in (0, gw1.port)
    bob = await cluster.user(1, "bob")
    alice = await tls_user(cluster, gw1.tls_port, "alice", certs.client_context())
    assert await bob.readline() == "* alice joined the chat"
    await alice.send("hello over TLS")
    assert await bob.readline() == "alice: hello over TLS"
    assert await alice.readline() == "alice: hello over TLS"
    await bob.send("hello in plain text")
    assert await alice.readline() == "bob: hello in plain text"
    assert await bob.readline() == "bob: hello in plain text"
    assert re.search(r"connection \S+ from 127\.0\.0\.1:\d+ over TLS", log_of(gw1))

    gw1.signal(signal.SIGTERM)
    assert await alice.expect(RESTART_NOTICE) == [RESTART_NOTICE]
    assert await alice.at_eof()
    assert await bob.readline() == "* alice left the chat"
    assert await gw1.wait(3 * T) == 0


async def test_chat_client_over_tls_checks_the_certificate_and_chats(
    cluster: Cluster, certs: Certificates
) -> None:
    """chat-client --tls --tls-ca (or CHAT_TLS and CHAT_TLS_CA) reaches the room over TLS,
    the certificate checked for the host name it was given, in a pipe as in a script."""
    (gateway,) = await cluster.start(1, *certs.gateway_args())
    watcher = await cluster.user(0, "watcher")
    status, out, err = await run_cli(
        "chat-client", "--host", "localhost", "--port", str(gateway.tls_port), "--tls",
        "--tls-ca", str(certs.ca_file), "--name", "bot", stdin=b"build 1234 passed\n",
    )  # fmt: skip
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "* Choose a name:" and lines[1].startswith("* Welcome, bot!")
    assert lines[2:] == ["bot: build 1234 passed", "* Goodbye, bot!"]
    assert await watcher.expect("* bot left the chat") == [
        "* bot joined the chat",
        "bot: build 1234 passed",
        "* bot left the chat",
    ]
    status, out, err = await run_cli(
        "chat-client", "--host", "127.0.0.1", "--name", "env-bot", stdin=b"from the env\n",
        env={"CHAT_PORT": str(gateway.tls_port), "CHAT_TLS": "1",
             "CHAT_TLS_CA": str(certs.ca_file)},
    )  # fmt: skip
    assert status == 0, err
    assert "env-bot: from the env" in out.splitlines()


async def test_chat_client_refuses_a_certificate_it_cannot_trust(
    cluster: Cluster, certs: Certificates
) -> None:
    """A certificate made out to another host name, or signed by a CA the client was not
    told to trust, is refused: one line on stderr, exit status 1, nothing sent; the gateway
    logs no traceback for the handshakes it lost."""
    certs.issue("chat.example.org", common_name="elsewhere")
    (gateway,) = await cluster.start(1, *certs.gateway_args())
    watcher = await cluster.user(0, "watcher")
    where = f"localhost:{gateway.tls_port}"
    for extra, reason in [
        (("--tls-ca", str(certs.ca_file)),
         "Hostname mismatch, certificate is not valid for 'localhost'."),
        ((), "unable to get local issuer certificate; --tls-ca FILE adds a CA to trust"),
    ]:  # fmt: skip
        status, out, err = await run_cli(
            "chat-client", "--host", "localhost", "--port", str(gateway.tls_port), "--tls",
            *extra, "--name", "mallory", stdin=b"hi\n",
        )  # fmt: skip
        assert status == 1
        assert out == ""
        assert err == f"chat-client: the TLS certificate of {where} was refused: {reason}\n"
    # Nobody got in: the next thing the watcher sees is its own line.
    await watcher.send("anyone?")
    assert await watcher.readline() == "watcher: anyone?"


async def test_plain_tcp_on_the_tls_port_is_rejected_cleanly(
    cluster: Cluster, certs: Certificates
) -> None:
    """A plain-TCP client on the TLS port is disconnected at its first line, never gets a
    prompt, and costs nothing else: the gateway serves both ports on, with no traceback
    and no error logged."""
    (gateway,) = await cluster.start(1, *certs.gateway_args())
    bob = await cluster.user(0, "bob")
    for attempt in range(3):
        plain = await ChatClient.connect(gateway.tls_port)
        cluster.clients.append(plain)
        await plain.send(f"alice-{attempt}")
        try:
            async with asyncio.timeout(T):
                data = await plain.reader.read()  # all there is, until the gateway closes
        except ConnectionResetError:
            data = b""
        assert b"Choose a name" not in data
    carol = await tls_user(cluster, gateway.tls_port, "carol", certs.client_context())
    assert await bob.readline() == "* carol joined the chat"
    await carol.send("the port still works")
    assert await bob.readline() == "carol: the port still works"
    dave = await cluster.user(0, "dave")
    await dave.send("so does this one")
    assert await carol.expect("dave: so does this one")
    assert not re.search(r" (ERROR|CRITICAL) ", log_of(gateway)), log_of(gateway)
    assert "alice-" not in log_of(gateway)


async def test_a_tls_client_that_stops_reading_is_cut_without_delaying_others(
    cluster: Cluster, certs: Certificates
) -> None:
    """PROTOCOL.md item 11 on the TLS port: a TLS client that stops reading is disconnected
    (its leave announced) once its queue passes the bound, while a TLS sender and a plain
    reader go on with everything in order."""
    (gateway,) = await cluster.start(1, "--rate-limit", "0", *certs.gateway_args())
    watcher = await cluster.user(0, "watcher")
    flooder = await tls_user(cluster, gateway.tls_port, "flooder", certs.client_context())
    stalled = await ChatClient.connect(gateway.tls_port, rcvbuf=4096, tls=certs.client_context())
    cluster.clients.append(stalled)
    await stalled.login("stalled")  # and never reads again
    await flood_past("stalled", watcher, flooder)
    assert re.search(r"stalled \(\S+\) stopped reading", log_of(gateway)), log_of(gateway)
    # Cut with data unread: a reset is what the client may see instead of an end.
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        assert await stalled.at_eof(2 * T)


async def test_sighup_reloads_the_certificate_without_dropping_anyone(
    cluster: Cluster, certs: Certificates, tmp_path: Path
) -> None:
    """Renewed files and SIGHUP: the gateway logs the reload, new handshakes get the new
    certificate, a TLS client connected before keeps chatting on its connection. Files
    that cannot be served at the next SIGHUP are logged and the renewed certificate stays."""
    (gateway,) = await cluster.start(1, *certs.gateway_args())
    assert gateway.log is not None
    alice = await tls_user(cluster, gateway.tls_port, "alice", certs.client_context())
    assert common_name(alice.writer.get_extra_info("peercert")) == "first"

    renewed = Certificates(tmp_path / "ca-2")
    renewed.issue(common_name="second")
    certs.cert_file.write_bytes(renewed.cert_file.read_bytes())
    certs.key_file.write_bytes(renewed.key_file.read_bytes())
    mark = len(gateway.log.lines)
    gateway.signal(signal.SIGHUP)
    await gateway.log.wait_for(r"INFO .*TLS certificate reloaded from ", start=mark)

    trust_new = renewed.client_context()
    bob = await tls_user(cluster, gateway.tls_port, "bob", trust_new)
    assert common_name(bob.writer.get_extra_info("peercert")) == "second"
    assert await alice.readline() == "* bob joined the chat"
    await alice.send("still on the old certificate")
    assert await bob.readline() == "alice: still on the old certificate"
    assert await alice.readline() == "alice: still on the old certificate"
    with pytest.raises(ssl.SSLCertVerificationError):
        await ChatClient.connect(gateway.tls_port, tls=certs.client_context())

    certs.key_file.write_text("not a key\n")
    mark = len(gateway.log.lines)
    gateway.signal(signal.SIGHUP)
    failed = await gateway.log.wait_for(r"ERROR .*TLS certificate not reloaded", start=mark)
    assert f"the TLS key {certs.key_file} holds no PEM private key" in failed.string
    carol = await tls_user(cluster, gateway.tls_port, "carol", trust_new)
    assert common_name(carol.writer.get_extra_info("peercert")) == "second"
    assert await bob.readline() == "* carol joined the chat"


@pytest.mark.parametrize("spoil", ["missing key", "key of another certificate", "not PEM"])
async def test_a_bad_certificate_or_key_at_start_is_one_line_and_exit_1(
    certs: Certificates, spoil: str
) -> None:
    """A gateway given a certificate or key it cannot serve says which file and why in one
    line, with no traceback, and exits 1 at once, without waiting for its Redis."""
    match spoil:
        case "missing key":
            certs.key_file.unlink()
            says = f"cannot read the TLS key {certs.key_file}: No such file or directory"
        case "key of another certificate":
            certs.key_file.write_bytes(certs.ca.issue_cert("x").private_key_pem.bytes())
            says = f"the TLS key {certs.key_file} is not the key of the certificate"
        case "not PEM":
            certs.cert_file.write_text("hello\n")
            says = f"the TLS certificate {certs.cert_file} holds no PEM certificate"
    status, _, err = await run_cli(
        "chat-gateway", "--host", "127.0.0.1", "--port", "0", *certs.gateway_args(),
        "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--redis-wait", str(10 * T),
    )  # fmt: skip
    assert status == 1
    assert len(err.splitlines()) == 1, err
    assert says in err and " ERROR " in err
    assert "Traceback" not in err


async def test_tls_flags_that_do_not_go_together_are_a_usage_error(certs: Certificates) -> None:
    """--tls-port without a certificate and key (or those without the port) is refused
    before anything starts, saying what is missing."""
    for args, says in [
        (("--tls-port", "0"), "--tls-port needs --tls-cert and --tls-key"),
        (("--tls-port", "0", "--tls-cert", str(certs.cert_file)), "--tls-port needs --tls-key"),
        (("--tls-cert", str(certs.cert_file), "--tls-key", str(certs.key_file)),
         "--tls-cert and --tls-key are for --tls-port or --web-port, neither is set"),
    ]:  # fmt: skip
        status, _, err = await run_cli("chat-gateway", "--port", "0", *args)
        assert status == 2, err
        assert says in err and "Traceback" not in err


async def test_chat_client_reconnects_over_tls_after_a_restart(
    cluster: Cluster, certs: Certificates
) -> None:
    """A chat-client --tls whose gateway is drained and restarted on the same ports comes
    back over TLS by itself, under its name, and what it is given afterwards is delivered."""
    await cluster.start(1)
    tls_port = free_port()
    restartable = GatewayProcess("gw-r", cluster.redis.url, "--tls-port", str(tls_port),
                                 *certs.gateway_args()[2:])  # fmt: skip
    await restartable.start()
    cluster.gateways.append(restartable)
    watcher = await cluster.user(0, "watcher")
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "chat-client"), "--host", "localhost", "--port", str(tls_port), "--tls",
        "--tls-ca", str(certs.ca_file), "--name", "phoenix", env=clean_env(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stderr is not None
    try:
        await watcher.expect("* phoenix joined the chat")
        await restartable.stop()
        assert await watcher.readline() == "* phoenix left the chat"
        await restartable.start(restartable.port)
        assert await watcher.readline(timeout=6 * T) == "* phoenix joined the chat"
        news: list[bytes] = []
        async with asyncio.timeout(2 * T):
            while b"back in the chat as phoenix" not in (line := await proc.stderr.readline()):
                news.append(line)
                assert line, b"".join(news)
        assert not any(b"TLS" in line for line in news), news
        proc.stdin.write(b"back over TLS\n")
        await proc.stdin.drain()
        assert await watcher.readline() == "phoenix: back over TLS"
        proc.stdin.close()
        async with asyncio.timeout(2 * T):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_web_port_serves_https_and_wss_with_the_certificate(
    cluster: Cluster, certs: Certificates
) -> None:
    """With a certificate and key the web port speaks HTTPS and WSS only (no TLS port
    needed): the page over HTTPS, the line protocol over WSS, in the same room as a plain
    TCP user; a plain-HTTP request there gets no page."""
    (gw,) = await cluster.start(
        1, "--web-port", "0", "--tls-cert", str(certs.cert_file), "--tls-key",
        str(certs.key_file),
    )  # fmt: skip
    assert re.search(r"web page and WebSocket on [\d.]+:\d+ \(https\)", log_of(gw))
    context = certs.client_context()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.web_port, ssl=context, server_hostname="localhost"
    )
    assert common_name(writer.get_extra_info("peercert")) == "first"
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(T):
        page = await reader.read()
    writer.close()
    assert page.startswith(b"HTTP/1.1 200 ") and b"<html" in page.lower()

    bob = await cluster.user(0, "bob")
    async with websockets.asyncio.client.connect(
        f"wss://localhost:{gw.web_port}/ws", ssl=context, open_timeout=T
    ) as ws:
        async with asyncio.timeout(T):
            assert await ws.recv() == "* Choose a name:"
            await ws.send("ana")
            assert str(await ws.recv()).startswith("* Welcome, ana! ")
            assert await bob.readline() == "* ana joined the chat"
            await ws.send("hello over WSS")
            assert await bob.readline() == "ana: hello over WSS"

    # Plain HTTP on that port is not served: the handshake fails, the gateway goes on.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.web_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    async with asyncio.timeout(3 * T):
        answer = await reader.read()
    writer.close()
    assert b"<html" not in answer.lower()
    assert await bob.readline() == "* ana left the chat"
    assert "Traceback" not in log_of(gw)
