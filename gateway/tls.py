"""TLS for the gateway's listeners: the server's certificate, loaded at start, renewed in
place (SIGHUP) without dropping anyone.

A listener is given :attr:`ServerTls.context` once, and that object never changes: the
chat's TLS port holds it, and any other TLS listener of the gateway (a web port) can be
given the same one and follow every reload with it. Each certificate and key pair is
loaded into a context of its own; the listener's context hands each new handshake to the
current pair through its SNI callback, which OpenSSL runs on every ClientHello, whether or
not it names a server. A reload builds the new context whole before swapping it in,
because ``load_cert_chain`` on a context in service that fails half-way (a key that does
not match the new certificate) leaves it with the new certificate and no key, and every
handshake after it fails. Connections already up keep what they negotiated.

A client that fails its handshake (plain TCP on the TLS port, a client refusing the
certificate, one that never finishes) costs its own connection and nothing else: no
:class:`~gateway.session.Session` is made before the handshake is done, and the loop's
report of the failure is at most one line (:func:`quiet_handshake_failures`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.errors import TlsError

log = logging.getLogger(__name__)

#: Seconds a client has to finish its TLS handshake. A real client needs one or two round
#: trips; this bounds what a connection that never finishes one (a plain-TCP client
#: waiting for the prompt, a port scanner) holds: a socket, and no session.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds a closing TLS connection waits for the client's close_notify before it is cut.
#: The user's leave is announced when the connection is gone, so asyncio's default (30 s)
#: would keep a user who quit "online" that long with a client that never answers; the
#: gateway's drain gives clients as long for their last lines (server.CLOSE_WAIT).
SHUTDOWN_TIMEOUT = 2.0
#: Bytes of a certificate or key file read at most. A chain of a few certificates is a
#: few KiB; a file past this is not one, and is refused rather than read.
MAX_PEM_BYTES = 1 << 20

_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----")
_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


class _EncryptedKey(Exception):
    """OpenSSL asked for the key's passphrase, which the gateway never has."""


def _no_passphrase() -> bytes:
    # Without a password callback OpenSSL would prompt on the terminal and block the
    # gateway, at start or at a reload.
    raise _EncryptedKey


def _read_pem(path: Path, what: str, marker: re.Pattern[bytes], kind: str) -> None:
    """Check that ``path`` can be read and holds a PEM ``kind``: OpenSSL's own errors for
    the wrong file ("PEM lib") do not say which file, nor what is wrong with it."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise TlsError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsError(f"the TLS {what} {path} is over {MAX_PEM_BYTES} bytes: not a PEM {kind}")
    if not marker.search(data):
        raise TlsError(f"the TLS {what} {path} holds no PEM {kind}")


def new_server_context() -> ssl.SSLContext:
    """A server context with this gateway's settings and no certificate yet."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client-initiated renegotiation costs the server a handshake each, on demand.
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


def load_server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context serving ``cert_file`` (a PEM certificate, followed by the
    intermediate certificates of its chain if any) with ``key_file`` (its PEM private key,
    unencrypted). Raises :class:`TlsError` naming the file at fault."""
    _read_pem(cert_file, "certificate", _CERTIFICATE, "certificate")
    _read_pem(key_file, "key", _PRIVATE_KEY, "private key")
    context = new_server_context()
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _EncryptedKey:
        raise TlsError(
            f"the TLS key {key_file} is encrypted: the gateway needs it without a passphrase"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"the TLS key {key_file} is not the key of the certificate {cert_file}"
            ) from None
        raise TlsError(
            f"cannot load the TLS certificate {cert_file} with the key {key_file}: "
            f"{exc.reason or exc}"
        ) from None
    except OSError as exc:  # a file replaced or removed since it was checked
        raise TlsError(
            f"cannot load the TLS certificate {cert_file} with the key {key_file}: "
            f"{exc.strerror or exc}"
        ) from None
    return context


class ServerTls:
    """The certificate and key a gateway serves TLS with, reloadable in place.

    Give :attr:`context` to every TLS listener (``create_server(ssl=...)``, with
    :data:`HANDSHAKE_TIMEOUT` and :data:`SHUTDOWN_TIMEOUT`); call :meth:`reload` when the
    files have been renewed.
    """

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        """Load the pair; :class:`TlsError` if it cannot be served."""
        self.cert_file = cert_file
        self.key_file = key_file
        #: What listeners hold. It serves the pair loaded at start, and hands each
        #: handshake to the current pair (the same one until a reload).
        self.context = load_server_context(cert_file, key_file)
        self._current = self.context
        self.context.sni_callback = self._choose

    def _choose(self, connection: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        # Runs inside OpenSSL's handshake: an exception here would fail the handshake and
        # be printed by sys.unraisablehook, so nothing here can raise.
        connection.context = self._current

    def reload(self) -> bool:
        """Read the certificate and key again: new handshakes get the new pair, connections
        already up keep theirs. A pair that cannot be served is logged and changes
        nothing (the previous pair stays in service): False."""
        try:
            context = load_server_context(self.cert_file, self.key_file)
        except TlsError as exc:
            log.error("TLS certificate not reloaded, still serving the previous one: %s", exc)
            return False
        self._current = context
        log.info(
            "TLS certificate reloaded from %s and %s: new connections get it",
            self.cert_file,
            self.key_file,
        )
        return True


def server_tls(config: GatewayConfig) -> ServerTls | None:
    """The gateway's TLS certificate as ``config`` names it (for the TLS port, the web
    port's HTTPS, or both), loaded; None without TLS. Raises :class:`TlsError`."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    return ServerTls(config.tls_cert, config.tls_key)


def quiet_handshake_failures(loop: asyncio.AbstractEventLoop) -> None:
    """Report a TLS connection's failure as one warning line, without a traceback.

    asyncio and uvloop keep most handshake failures to themselves (an ``ssl.SSLError`` is
    an ``OSError``, reported only in debug mode); anything TLS they do pass to the loop's
    exception handler is still the failure of one client's connection, and the default
    handler would log it with a traceback. Everything else goes to the default handler.
    """

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if isinstance(exc, ssl.SSLError) or message.startswith("SSL "):
            peer = _peer(context)
            where = f" from {peer}" if peer else ""
            log.warning("TLS connection%s failed: %s", where, exc or message)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def _peer(context: dict[str, Any]) -> str:
    transport = context.get("transport")
    try:
        peer = transport.get_extra_info("peername") if transport is not None else None
    except Exception:  # a transport half torn down: the warning goes without the address
        return ""
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
