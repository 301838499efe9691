"""Gateways and chat-admin on a Redis that wants a password, and on one that speaks TLS."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import Cluster
from tests.support import LogWatcher, RedisServer, T, free_port, run_cli

pytestmark = pytest.mark.integration

PASSWORD = "s3cr3t-pass"
WRONG_PASSWORD = "wr0ng-pass"

OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = unused

[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


class ConfiguredRedisServer(RedisServer):
    """A throwaway ``redis-server`` with a password and, optionally, TLS only.

    ``url`` carries the password (and, with TLS, the ``rediss`` scheme and the CA to trust),
    so a :class:`Cluster` on this server starts its gateways with credentials.
    """

    def __init__(self, password: str, tls: tuple[Path, Path, Path] | None = None) -> None:
        """``tls``: (CA certificate, server certificate, server key); the plain port is off
        and ``port`` is the TLS port."""
        super().__init__()
        self.password = password
        self.tls = tls

    def url_with(
        self,
        password: str | None,
        scheme: str | None = None,
        host: str = "127.0.0.1",
        ca: bool = True,
    ) -> str:
        """This server's URL with ``password`` (None: none), ``scheme`` and ``host``; with
        TLS and ``ca``, trusting the test CA."""
        scheme = scheme or ("rediss" if self.tls else "redis")
        auth = f":{password}@" if password is not None else ""
        query = f"?ssl_ca_certs={quote(str(self.tls[0]))}" if self.tls and ca else ""
        return f"{scheme}://{auth}{host}:{self.port}/0{query}"

    @property
    def url(self) -> str:
        return self.url_with(self.password)

    async def start(self, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        assert exe is not None, "redis-server is not installed: the integration tests need it"
        self.port = port or self.port or free_port()
        listen = ["--port", str(self.port)]
        if self.tls:
            ca, cert, key = (str(p) for p in self.tls)
            listen = [
                "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                "--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            exe, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self._dir, "--daemonize", "no", "--requirepass", self.password,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.log = LogWatcher(self.proc.stdout, f"redis-server :{self.port}")
        try:
            await self.log.wait_for(r"Ready to accept connections")
        except AssertionError as exc:
            hint = " (is this redis-server built with TLS support?)" if self.tls else ""
            raise AssertionError(f"redis-server did not start{hint}: {exc}") from None


async def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for IP 127.0.0.1 signed by it, made with
    openssl in ``directory``: (CA certificate, server certificate, server key)."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is not installed: the TLS test needs it for certificates"
    config = directory / "openssl.cnf"
    config.write_text(OPENSSL_CONFIG)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        ["req", "-x509", "-new", *new_key, "-keyout", ca_key, "-out", ca, "-days", "1",
         "-subj", "/CN=chat-test-ca", "-config", config, "-extensions", "v3_ca"],
        ["req", "-new", *new_key, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1",
         "-config", config],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", "2",
         "-days", "1", "-out", cert, "-extfile", config, "-extensions", "v3_server"],
    ]  # fmt: skip
    for step in steps:
        proc = await asyncio.create_subprocess_exec(
            openssl, *map(str, step),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            async with asyncio.timeout(6 * T):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"openssl {step[0]} did not finish in {6 * T:.0f}s") from None
        assert proc.returncode == 0, f"openssl {' '.join(map(str, step))} failed:\n{out.decode()}"
    return ca, cert, key


@pytest.fixture
async def password_redis() -> AsyncIterator[ConfiguredRedisServer]:
    server = ConfiguredRedisServer(PASSWORD)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def tls_redis(tmp_path: Path) -> AsyncIterator[ConfiguredRedisServer]:
    server = ConfiguredRedisServer(PASSWORD, tls=await make_certificates(tmp_path))
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def password_cluster(password_redis: ConfiguredRedisServer) -> AsyncIterator[Cluster]:
    cluster = Cluster(password_redis)
    yield cluster
    await cluster.close()


@pytest.fixture
async def tls_cluster(tls_redis: ConfiguredRedisServer) -> AsyncIterator[Cluster]:
    cluster = Cluster(tls_redis)
    yield cluster
    await cluster.close()


async def chat_across(cluster: Cluster) -> None:
    """alice on the first gateway and bob on the second hear each other."""
    alice = await cluster.user(0, "alice")
    bob = await cluster.user(1, "bob")
    await alice.expect("* bob joined the chat")
    await bob.send("hello from gw-2")
    await alice.expect("bob: hello from gw-2")
    await bob.expect("bob: hello from gw-2")
    await alice.send("hello from gw-1")
    await bob.expect("alice: hello from gw-1")


def gateway_logs(cluster: Cluster) -> str:
    logs = []
    for gateway in cluster.gateways:
        assert gateway.log is not None
        logs.append(gateway.log.text())
    return "\n".join(logs)


async def test_gateways_and_admin_work_with_a_password(
    password_redis: ConfiguredRedisServer, password_cluster: Cluster
) -> None:
    """With the password in the URL two gateways share the room and chat-admin sees both
    users, and the password is in no log line nor admin output."""
    await password_cluster.start(2)
    await chat_across(password_cluster)
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", password_redis.url, "who", "--json"
    )
    assert (status, err) == (0, ""), err
    assert {(u["name"], u["gateway"]) for u in json.loads(out)} == {
        ("alice", "gw-1"),
        ("bob", "gw-2"),
    }
    assert PASSWORD not in out
    await asyncio.gather(*(g.stop() for g in password_cluster.gateways))
    logs = gateway_logs(password_cluster)
    assert f"redis://:***@127.0.0.1:{password_redis.port}/0" in logs
    assert PASSWORD not in logs


async def test_gateway_with_a_wrong_password_exits_with_a_redacted_error(
    password_redis: ConfiguredRedisServer,
) -> None:
    """A gateway given a wrong password gives up after --redis-wait with one last line that
    names the Redis with the password masked, and no traceback."""
    status, out, err = await run_cli(
        "chat-gateway", "--host", "127.0.0.1", "--port", "0", "--gateway-id", "gw-wrong",
        "--redis-url", password_redis.url_with(WRONG_PASSWORD), "--redis-wait", "1",
    )  # fmt: skip
    assert status != 0, err
    assert err.strip(), "the gateway exited without logging why"
    last = err.strip().splitlines()[-1]
    assert f"redis://:***@127.0.0.1:{password_redis.port}/0" in last, err
    assert "Traceback" not in err, err
    for secret in (WRONG_PASSWORD, PASSWORD):
        assert secret not in err, err
        assert secret not in out, out


async def test_admin_with_a_wrong_password_is_one_line_without_it(
    password_redis: ConfiguredRedisServer,
) -> None:
    """chat-admin with a wrong password: exit 1, one line on stderr, no password in it."""
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", password_redis.url_with(WRONG_PASSWORD), "who", "--json"
    )
    assert status == 1, (out, err)
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("chat-admin: "), err
    assert WRONG_PASSWORD not in err
    assert PASSWORD not in err


async def test_gateways_chat_through_redis_over_tls(
    tls_redis: ConfiguredRedisServer, tls_cluster: Cluster
) -> None:
    """Gateways on a TLS-only, password-protected Redis (rediss:// trusting a private CA)
    share the room, and the password is in no log line."""
    await tls_cluster.start(2)
    await chat_across(tls_cluster)
    status, out, err = await run_cli("chat-admin", "--redis-url", tls_redis.url, "who", "--json")
    assert (status, err) == (0, ""), err
    assert sorted(u["name"] for u in json.loads(out)) == ["alice", "bob"]
    await asyncio.gather(*(g.stop() for g in tls_cluster.gateways))
    logs = gateway_logs(tls_cluster)
    assert f"rediss://:***@127.0.0.1:{tls_redis.port}/0" in logs
    assert PASSWORD not in logs


@pytest.mark.parametrize(
    ("scheme", "host", "ca"),
    [("redis", "127.0.0.1", False), ("rediss", "127.0.0.1", False), ("rediss", "localhost", True)],
    ids=["plaintext", "untrusted-ca", "hostname-mismatch"],
)
async def test_tls_redis_refuses_plaintext_and_unverified_clients(
    tls_redis: ConfiguredRedisServer, scheme: str, host: str, ca: bool
) -> None:
    """The TLS Redis is really TLS, verified: plain redis://, rediss:// without the CA and
    rediss:// to a name the certificate is not for all fail in one chat-admin line, without
    the password."""
    url = tls_redis.url_with(PASSWORD, scheme=scheme, host=host, ca=ca)
    status, out, err = await run_cli("chat-admin", "--redis-url", url, "who")
    assert status == 1, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("chat-admin: "), err
    assert PASSWORD not in err


async def test_admin_tls_option_on_a_plain_url_is_one_line(
    password_redis: ConfiguredRedisServer, tmp_path: Path
) -> None:
    """chat-admin given a redis:// URL with a TLS option (rediss:// mistyped) refuses it in
    one line on stderr, exit 1, without the password."""
    url = f"{password_redis.url}?ssl_ca_certs={quote(str(tmp_path / 'ca.pem'))}"
    status, out, err = await run_cli("chat-admin", "--redis-url", url, "who")
    assert status == 1, (out, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("chat-admin: "), err
    assert PASSWORD not in err


async def test_gateway_tls_option_on_a_plain_url_is_one_line(
    password_redis: ConfiguredRedisServer, tmp_path: Path
) -> None:
    """A gateway given a redis:// URL with a TLS option (rediss:// mistyped) exits non-zero
    with a last log line naming the redacted URL, no traceback, no password."""
    url = f"{password_redis.url}?ssl_ca_certs={quote(str(tmp_path / 'ca.pem'))}"
    status, _, err = await run_cli(
        "chat-gateway", "--host", "127.0.0.1", "--port", "0", "--gateway-id", "gw-typo",
        "--redis-url", url, "--redis-wait", "1",
    )  # fmt: skip
    assert status != 0, err
    assert "Traceback" not in err, err
    assert f"redis://:***@127.0.0.1:{password_redis.port}/0" in err.strip().splitlines()[-1], err
    assert PASSWORD not in err
