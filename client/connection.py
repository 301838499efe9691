"""One TCP connection to a gateway, plain or TLS: the thin asyncio layer under
:class:`ClientProtocol`."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path

from client.errors import ConnectFailed
from client.protocol import ClientProtocol, Event

#: Seconds to wait for a TCP connection (and its TLS handshake) before calling the gateway
#: unreachable.
CONNECT_TIMEOUT = 10.0
#: OpenSSL's verification results that mean "signed by a CA you do not trust", which a
#: private CA's file given to --tls-ca cures: unable to get the issuer certificate (2, 20),
#: self-signed (18, 19).
_UNTRUSTED_ISSUER = frozenset({2, 18, 19, 20})
#: Keepalive: probe after 30 s idle, every 10 s, give up after 3 misses, so a vanished
#: gateway or a dead network path is noticed in about a minute even when the chat is quiet.
KEEPALIVE = (30, 10, 3)


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, count = KEEPALIVE
    for option, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", count),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def tls_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A client context that checks the gateway's certificate against the system's CAs and
    those in ``ca_file`` (PEM), and its host name. OSError (ssl.SSLError included) if
    ``ca_file`` cannot be read or holds no certificate."""
    context = ssl.create_default_context()  # verifies the chain and the host name
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


async def connect(
    host: str,
    port: int,
    connect_timeout: float = CONNECT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> Connection:
    """Connect to ``host:port``, over TLS with ``tls`` (the certificate checked for
    ``host``); :class:`ConnectFailed` says why not, in one line."""
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 16, ssl=tls)
    except ssl.SSLCertVerificationError as exc:
        hint = "; --tls-ca FILE adds a CA to trust" if exc.verify_code in _UNTRUSTED_ISSUER else ""
        raise ConnectFailed(
            f"the TLS certificate of {where} was refused: {exc.verify_message}{hint}"
        ) from None
    except ssl.SSLError as exc:
        raise ConnectFailed(
            f"TLS handshake with {where} failed ({exc.reason or exc}): is it a TLS port?"
        ) from None
    except socket.gaierror as exc:
        raise ConnectFailed(f"cannot find host {host!r}: {exc.strerror}") from None
    except ConnectionRefusedError:
        raise ConnectFailed(f"connection refused by {where}: is a gateway running there?") from None
    except TimeoutError:
        raise ConnectFailed(f"no answer from {where} within {connect_timeout:.0f}s") from None
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {where}: {exc.strerror or exc}") from None
    sock = writer.get_extra_info("socket")
    if sock is not None:
        _keepalive(sock)
    return Connection(reader, writer)


class Connection:
    """Reads server events and writes the protocol's output."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.protocol = ClientProtocol()
        self._reader = reader
        self._writer = writer

    async def events(self) -> AsyncIterator[Event]:
        """Server events until the connection ends (a reset counts as an end)."""
        while True:
            try:
                data = await self._reader.read(1 << 16)
            except OSError:
                data = b""
            if not data:
                for event in self.protocol.receive_eof():
                    yield event
                return
            for event in self.protocol.receive_data(data):
                yield event

    def send_name(self, name: str) -> None:
        self.protocol.send_name(name)
        self._flush()

    def send_line(self, line: str) -> None:
        self.protocol.send_line(line)
        self._flush()

    def _flush(self) -> None:
        if not self._writer.is_closing():
            self._writer.write(self.protocol.data_to_send())

    async def drain(self) -> None:
        """Wait while the gateway is not taking our lines in (it paces a fast sender by not
        reading): what waits to be sent stays bounded. A broken link ends the wait."""
        with suppress(OSError, RuntimeError):  # the link is going; events() reports its end
            await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        try:
            async with asyncio.timeout(1):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            pass
