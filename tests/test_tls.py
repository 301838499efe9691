"""TLS in one process: the gateway's certificate (loading, reloading), its TLS listener on
the embedded broker, and the client's checks of the server's certificate."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from broker import RedisBroker
from chatwire.texts import slow_down_text
from client.cli import cli as client_cli
from client.connection import connect, tls_context
from client.errors import ConnectFailed
from client.session import ChatSession
from gateway import server as server_module
from gateway.config import GatewayConfig
from gateway.errors import TlsError
from gateway.server import Gateway
from gateway.tls import MAX_PEM_BYTES, ServerTls, quiet_handshake_failures
from tests.support import ChatClient, T, free_port, port_of
from tests.test_client_session import FakeUI, fast_backoff, finished
from tests.tls_support import Certificates, common_name

RESTART_NOTICE = "* Server restarting: please reconnect."


def tls_config(certs: Certificates, **settings: Any) -> GatewayConfig:
    return GatewayConfig(
        host="127.0.0.1", port=settings.pop("port", 0), history=0,
        tls_port=settings.pop("tls_port", 0), tls_cert=certs.cert_file, tls_key=certs.key_file,
        **settings,
    )  # fmt: skip


async def start_gateway(config: GatewayConfig) -> Gateway:
    gateway = Gateway(config, RedisBroker.embedded())
    await gateway.start()
    return gateway


@pytest.fixture
async def gateway(certs: Certificates) -> AsyncIterator[Gateway]:
    gw = await start_gateway(tls_config(certs))
    yield gw
    async with asyncio.timeout(3 * T):
        await gw.shutdown()


@pytest.fixture
async def clients() -> AsyncIterator[list[ChatClient]]:
    opened: list[ChatClient] = []
    yield opened
    await asyncio.gather(*(c.close() for c in opened))


async def tls_user(
    gateway: Gateway, name: str, clients: list[ChatClient], context: ssl.SSLContext
) -> ChatClient:
    client = await ChatClient.connect(gateway.tls_port, tls=context)
    clients.append(client)
    await client.login(name)
    return client


async def plain_user(gateway: Gateway, name: str, clients: list[ChatClient]) -> ChatClient:
    client = await ChatClient.connect(port_of(gateway))
    clients.append(client)
    await client.login(name)
    return client


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# --- the certificate ----------------------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    """A way to spoil the gateway's files, and what the error must say."""

    label: str
    says: str

    def apply(self, certs: Certificates) -> Path:
        """Spoil the files; return the one at fault."""
        match self.label:
            case "no certificate file":
                certs.cert_file.unlink()
                return certs.cert_file
            case "no key file":
                certs.key_file.unlink()
                return certs.key_file
            case "certificate not PEM":
                certs.cert_file.write_text("hello\n")
                return certs.cert_file
            case "key file holds a certificate":
                certs.key_file.write_bytes(certs.cert_file.read_bytes())
                return certs.key_file
            case "another certificate's key":
                other = certs.ca.issue_cert("localhost")
                certs.key_file.write_bytes(other.private_key_pem.bytes())
                return certs.key_file
            case "encrypted key":
                key = serialization.load_pem_private_key(certs.key_file.read_bytes(), None)
                certs.key_file.write_bytes(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.BestAvailableEncryption(b"secret"),
                    )
                )
                return certs.key_file
            case "certificate too big":
                certs.cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\n" * MAX_PEM_BYTES)
                return certs.cert_file
        raise AssertionError(self.label)


BROKEN = [
    Broken("no certificate file", "cannot read the TLS certificate"),
    Broken("no key file", "cannot read the TLS key"),
    Broken("certificate not PEM", "holds no PEM certificate"),
    Broken("key file holds a certificate", "holds no PEM private key"),
    Broken("another certificate's key", "is not the key of the certificate"),
    Broken("encrypted key", "is encrypted: the gateway needs it without a passphrase"),
    Broken("certificate too big", "not a PEM certificate"),
]


@pytest.mark.parametrize("broken", BROKEN, ids=[b.label for b in BROKEN])
def test_an_unusable_certificate_or_key_is_one_line_naming_the_file(
    certs: Certificates, broken: Broken
) -> None:
    """Each way a certificate or key cannot be served is refused with a one-line reason
    naming the file at fault (an encrypted key is refused, not prompted for)."""
    culprit = broken.apply(certs)
    with pytest.raises(TlsError) as caught:
        ServerTls(certs.cert_file, certs.key_file)
    message = str(caught.value)
    assert broken.says in message and str(culprit) in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({}, None),
        ({"tls_port": 6697, "tls_cert": Path("c"), "tls_key": Path("k")}, None),
        ({"tls_port": 0, "port": 0, "tls_cert": Path("c"), "tls_key": Path("k")}, None),
        ({"tls_port": 6697}, "--tls-port needs --tls-cert and --tls-key"),
        ({"tls_port": 6697, "tls_cert": Path("c")}, "--tls-port needs --tls-key"),
        ({"tls_cert": Path("c"), "tls_key": Path("k")}, "for --tls-port or --web-port, neither"),
        ({"web_port": 8000, "tls_cert": Path("c"), "tls_key": Path("k")}, None),
        ({"web_port": 8000, "tls_cert": Path("c")}, "HTTPS on --web-port needs --tls-key too"),
        (
            {"tls_port": 5555, "tls_cert": Path("c"), "tls_key": Path("k")},
            "--tls-port and --port are both 5555",
        ),
    ],
)
def test_tls_settings_are_checked_together(settings: dict[str, Any], problem: str | None) -> None:
    """--tls-port needs a certificate and a key, which need --tls-port (on a port of its
    own) or --web-port (HTTPS)."""
    found = GatewayConfig(**settings).tls_problem()
    assert found == problem if problem is None else (found is not None and problem in found)


async def test_reload_serves_the_new_certificate_to_new_connections_only(
    gateway: Gateway, certs: Certificates, tmp_path: Path, clients: list[ChatClient]
) -> None:
    """After a reload (here from another CA) new handshakes get the new certificate;
    a client connected before keeps its connection, and chats with the newcomer."""
    alice = await tls_user(gateway, "alice", clients, certs.client_context())
    renewed = Certificates(tmp_path / "ca-2")
    renewed.issue(common_name="second")
    for suffix in ("cert_file", "key_file"):
        getattr(certs, suffix).write_bytes(getattr(renewed, suffix).read_bytes())
    assert gateway.tls is not None and gateway.tls.reload()

    both = certs.client_context()
    both.load_verify_locations(cafile=renewed.ca_file)
    bob = await tls_user(gateway, "bob", clients, both)
    assert common_name(bob.writer.get_extra_info("peercert")) == "second"
    assert common_name(alice.writer.get_extra_info("peercert")) == "first"
    assert await alice.readline() == "* bob joined the chat"
    await alice.send("still here")
    assert await bob.readline() == "alice: still here"
    assert await alice.readline() == "alice: still here"
    # The old CA alone no longer trusts what the port serves.
    with pytest.raises(ssl.SSLCertVerificationError):
        await ChatClient.connect(gateway.tls_port, tls=certs.client_context())


@pytest.mark.parametrize("broken", BROKEN[:6], ids=[b.label for b in BROKEN[:6]])
async def test_a_reload_that_fails_keeps_the_previous_certificate(
    gateway: Gateway,
    certs: Certificates,
    clients: list[ChatClient],
    caplog: pytest.LogCaptureFixture,
    broken: Broken,
) -> None:
    """Files that cannot be served are logged, in one line, and change nothing: new
    handshakes still get the certificate loaded before."""
    broken.apply(certs)
    assert gateway.tls is not None and not gateway.tls.reload()
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage().startswith("TLS certificate not reloaded, still serving")
    assert broken.says in record.getMessage() and not record.exc_info
    bob = await tls_user(gateway, "bob", clients, certs.client_context())
    assert common_name(bob.writer.get_extra_info("peercert")) == "first"


# --- the TLS listener ---------------------------------------------------------------------


async def test_tls_and_plain_clients_share_the_rooms(
    gateway: Gateway,
    certs: Certificates,
    clients: list[ChatClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The TLS port speaks the same protocol to the same rooms as the plain one."""
    caplog.set_level(logging.INFO)
    bob = await plain_user(gateway, "bob", clients)
    alice = await tls_user(gateway, "alice", clients, certs.client_context())
    assert await bob.readline() == "* alice joined the chat"
    await alice.send("/join #math")
    assert (await alice.readline()).startswith("* You are in #math now")
    assert await bob.readline() == "* alice left for #math"
    await bob.send("/join #math")
    assert (await bob.readline()).startswith("* You are in #math now")
    assert await alice.readline() == "* bob joined #math"
    await bob.send("hi over tcp")
    assert await alice.readline() == "bob: hi over tcp"
    await alice.send("/msg bob hi over tls")
    assert await bob.expect("(private) alice: hi over tls")
    assert any("over TLS" in r.getMessage() for r in caplog.records)


async def test_a_failed_handshake_costs_only_its_own_connection(
    gateway: Gateway,
    certs: Certificates,
    clients: list[ChatClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Plain TCP on the TLS port is closed; a client that does not trust the certificate
    gives up; neither reaches the chat or logs a traceback, and the gateway serves on."""
    bob = await tls_user(gateway, "bob", clients, certs.client_context())
    plain = await ChatClient.connect(gateway.tls_port)
    clients.append(plain)
    await plain.send("alice")
    assert await plain.at_eof()
    with pytest.raises(ssl.SSLCertVerificationError):
        await ChatClient.connect(gateway.tls_port, tls=ssl.create_default_context())
    assert gateway.stats()["connections"] == 1
    await tls_user(gateway, "carol", clients, certs.client_context())
    assert await bob.readline() == "* carol joined the chat"
    assert tracebacks(caplog) == []


async def test_a_client_that_never_starts_its_handshake_is_closed_in_time(
    certs: Certificates, clients: list[ChatClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain-TCP client that waits for a prompt on the TLS port (it never sends a
    ClientHello) is closed once the handshake's time is up, without a prompt."""
    monkeypatch.setattr(server_module, "HANDSHAKE_TIMEOUT", 0.2)
    gateway = await start_gateway(tls_config(certs))
    try:
        silent = await ChatClient.connect(gateway.tls_port)
        clients.append(silent)
        async with asyncio.timeout(T):
            assert await silent.reader.read() == b""
        assert gateway.stats()["connections"] == 0
    finally:
        await gateway.shutdown()


async def test_tls_clients_count_against_the_connection_limits(
    certs: Certificates, clients: list[ChatClient]
) -> None:
    """--max-clients and --max-per-address count the connections of both ports."""
    gateway = await start_gateway(tls_config(certs, max_clients=2, max_per_address=1))
    try:
        await tls_user(gateway, "alice", clients, certs.client_context())
        plain = await ChatClient.connect(port_of(gateway))
        clients.append(plain)
        assert await plain.readline() == "! too many connections from your address"
        assert await plain.at_eof()
    finally:
        await gateway.shutdown()
    gateway = await start_gateway(tls_config(certs, max_clients=1, max_per_address=0))
    try:
        await plain_user(gateway, "bob", clients)
        late = await ChatClient.connect(gateway.tls_port, tls=certs.client_context())
        clients.append(late)
        assert await late.readline() == "! this server is full; try again later"
        assert await late.at_eof()
    finally:
        await gateway.shutdown()


async def test_flood_control_paces_a_tls_client_without_dropping_a_line(
    certs: Certificates, clients: list[ChatClient]
) -> None:
    """PROTOCOL.md item 12 on the TLS port: past its burst a client is told to slow down
    and its lines are taken in at the rate, every one of them, in order."""
    gateway = await start_gateway(tls_config(certs, rate_limit=50.0, rate_burst=5))
    try:
        alice = await tls_user(gateway, "alice", clients, certs.client_context())
        alice.writer.write(b"".join(f"line {n}\n".encode() for n in range(20)))
        seen = await alice.expect("alice: line 19")
        assert "* " + slow_down_text(50.0) in seen
        assert [line for line in seen if line.startswith("alice: ")] == [
            f"alice: line {n}" for n in range(20)
        ]
    finally:
        await gateway.shutdown()


async def test_a_tls_client_that_closes_is_announced_as_left(
    gateway: Gateway,
    certs: Certificates,
    clients: list[ChatClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A TLS client's close (close_notify, then FIN) is a leave like a TCP client's EOF,
    and the gateway logs no warning about it."""
    bob = await plain_user(gateway, "bob", clients)
    alice = await tls_user(gateway, "alice", clients, certs.client_context())
    assert await bob.readline() == "* alice joined the chat"
    await alice.send("bye without sair")
    assert await bob.readline() == "alice: bye without sair"
    await alice.close()
    assert await bob.readline() == "* alice left the chat"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


class HalfHandshake:
    """A TLS client driven by hand, so that a test can stop it just before its last
    handshake message: the server has accepted the connection and answered, and makes
    the session only when that message comes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 context: ssl.SSLContext) -> None:  # fmt: skip
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    @classmethod
    async def start(cls, port: int, context: ssl.SSLContext) -> HalfHandshake:
        """Connect, and handshake up to (not including) the client's Finished message."""
        client = cls(*await asyncio.open_connection("127.0.0.1", port), context)
        async with asyncio.timeout(T):
            while True:
                try:
                    client.tls.do_handshake()
                    return client  # the Finished message waits in self.outgoing
                except ssl.SSLWantReadError:
                    client.writer.write(client.outgoing.read())
                    data = await client.reader.read(65536)
                    assert data, "the server closed during the handshake"
                    client.incoming.write(data)

    def finish(self) -> None:
        self.writer.write(self.outgoing.read())

    async def read_all(self) -> str:
        """Everything the server sends until it closes, decrypted."""
        received = b""
        async with asyncio.timeout(T):
            while True:
                try:
                    chunk = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    chunk = None
                if chunk == b"":  # close_notify
                    return received.decode()
                if chunk:
                    received += chunk
                    continue
                self.writer.write(self.outgoing.read())
                data = await self.reader.read(65536)
                if not data:
                    return received.decode()
                self.incoming.write(data)


async def test_shutdown_closes_the_tls_port_and_tells_its_clients(
    certs: Certificates, clients: list[ChatClient]
) -> None:
    """A drain tells TLS clients to reconnect and closes them, and stops the TLS port; a
    handshake still under way when the port closed ends the same way, uncounted."""
    gateway = await start_gateway(tls_config(certs))
    alice = await tls_user(gateway, "alice", clients, certs.client_context())
    late = await HalfHandshake.start(gateway.tls_port, certs.client_context())
    try:
        async with asyncio.timeout(3 * T):
            await gateway.shutdown()
        assert await alice.expect(RESTART_NOTICE) == [RESTART_NOTICE]
        assert await alice.at_eof()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", gateway.tls_port)
        late.finish()
        assert await late.read_all() == RESTART_NOTICE + "\n"
        assert gateway.stats()["connections"] == 0
    finally:
        late.writer.close()


def test_handshake_failures_reported_to_the_loop_are_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the loop reports about a TLS connection is one warning without a traceback;
    anything else still goes to the default handler."""
    loop = asyncio.new_event_loop()
    try:
        quiet_handshake_failures(loop)
        error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
        loop.call_exception_handler({"message": "SSL handshake failed", "exception": error})
        (record,) = caplog.records
        assert record.levelno == logging.WARNING and not record.exc_info
        assert record.getMessage() == f"TLS connection failed: {error}"
        caplog.clear()
        loop.call_exception_handler({"message": "boom", "exception": ValueError("x")})
        (record,) = caplog.records
        assert record.levelno == logging.ERROR and record.exc_info
    finally:
        loop.close()


# --- the client ---------------------------------------------------------------------------


async def test_the_client_checks_the_certificate_and_the_host_name(
    gateway: Gateway, certs: Certificates, tmp_path: Path
) -> None:
    """The client connects over TLS to a certificate its CA file vouches for, made out to
    the host it was given; it refuses a certificate from an unknown CA, one made out to
    another name, and a port that does not speak TLS, each in one line."""
    trusted = tls_context(certs.ca_file)
    conn = await connect("localhost", gateway.tls_port, tls=trusted)
    await conn.close()
    conn = await connect("127.0.0.1", gateway.tls_port, tls=trusted)
    await conn.close()

    with pytest.raises(ConnectFailed) as caught:
        await connect("localhost", gateway.tls_port, tls=tls_context())
    assert "certificate verify failed" not in str(caught.value)
    assert "--tls-ca FILE adds a CA to trust" in str(caught.value)

    certs.issue("chat.example.org", common_name="elsewhere")
    assert gateway.tls is not None and gateway.tls.reload()
    with pytest.raises(ConnectFailed) as caught:
        await connect("localhost", gateway.tls_port, tls=trusted)
    assert str(caught.value) == (
        f"the TLS certificate of localhost:{gateway.tls_port} was refused: "
        "Hostname mismatch, certificate is not valid for 'localhost'."
    )

    with pytest.raises(ConnectFailed, match=r"is it a TLS port\?"):
        await connect("localhost", port_of(gateway), tls=trusted)


def test_a_ca_file_that_cannot_be_used_is_an_error(tmp_path: Path) -> None:
    """A missing or non-PEM --tls-ca file is an OSError the CLI turns into one line."""
    with pytest.raises(FileNotFoundError):
        tls_context(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("junk\n")
    with pytest.raises(ssl.SSLError):
        tls_context(tmp_path / "junk.pem")


async def test_the_client_reconnects_over_tls(certs: Certificates) -> None:
    """A session over TLS whose gateway restarts reconnects over TLS, under its name."""
    port, tls_port = free_port(), free_port()
    config = tls_config(certs, port=port, tls_port=tls_port)
    first = await start_gateway(config)
    second: Gateway | None = None
    ui = FakeUI()
    chat = ChatSession("localhost", tls_port, "alice", ui, interactive=True,
                       backoff=fast_backoff(), tls=tls_context(certs.ca_file))  # fmt: skip
    task = asyncio.create_task(chat.run())
    try:
        await ui.wait_for("joined", "alice")
        await first.shutdown()
        lost = await ui.wait_for("status", f"connection to localhost:{tls_port} lost")
        second = await start_gateway(config)
        await ui.wait_for("status", "back in the chat as alice", start=lost)
        ui.type("over tls again")
        await ui.wait_for("show", "alice: over tls again", start=lost)
        ui.type("sair")
        assert await finished(task) == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await first.shutdown()
        if second is not None:
            await second.shutdown()


@pytest.mark.parametrize("flags", [["--tls"], ["--tls-ca", "{ca}"], ["--tls", "--port", "{free}"]])
def test_chat_client_port_defaults_to_6697_with_tls(
    certs: Certificates, flags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --tls (or --tls-ca, which implies it) the default port is 6697, IRC's TLS
    port, unless --port says otherwise. (Nothing listens there: the refusal names the
    port tried.)"""
    for variable in ("CHAT_HOST", "CHAT_PORT", "CHAT_TLS", "CHAT_TLS_CA"):
        monkeypatch.delenv(variable, raising=False)
    free = str(free_port())
    args = [flag.replace("{ca}", str(certs.ca_file)).replace("{free}", free) for flag in flags]
    port = free if "--port" in args else "6697"
    result = CliRunner().invoke(
        client_cli, ["--host", "127.0.0.1", *args, "--name", "x"], input="hi\n"
    )
    assert result.exit_code == 1, result.output
    assert f"connection refused by 127.0.0.1:{port}" in result.output
