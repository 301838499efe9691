"""The web port: ``GET /`` serves the chat page, ``/ws`` is the line protocol over WebSocket.

One server from the websockets library does both: ``process_request`` answers plain HTTP
requests (the page, or 404) before any WebSocket handshake, and ``/ws`` goes on to the
handshake and then to the gateway's handler, which runs a
:class:`~gateway.web.transport.WebSocketTransport` under an ordinary session.

The page is one self-contained file (``index.html``, package data: no CDN, nothing to
build), served with a Content-Security-Policy that lets only its own inline script and
style run and lets it connect only to its own origin.

TLS: :meth:`WebServer.start` takes an :class:`ssl.SSLContext`; given one, the port serves
HTTPS and WSS (the page picks ``wss:`` by itself when it was loaded over HTTPS).
"""

from __future__ import annotations

import base64
import hashlib
import http
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from importlib import resources

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway.web.transport import CLOSE_TIMEOUT, MAX_MESSAGE_BYTES, MAX_QUEUED_FRAMES

#: Where the WebSocket endpoint is; everything else but ``/`` is 404.
WS_PATH = "/ws"
#: Seconds a client has to complete the opening handshake (TLS included).
OPEN_TIMEOUT = 10.0
#: Connections waiting to be accepted; as for the TCP port, arrivals come in bursts.
BACKLOG = 1024

Handler = Callable[[ServerConnection], Awaitable[None]]

#: The library logs each connection opened and each page served at INFO; sessions log
#: their connections themselves, so only its warnings and errors are worth a line.
_library_log = logging.getLogger(__name__ + ".websockets")
_library_log.setLevel(logging.WARNING)


def page() -> bytes:
    """The chat page, as shipped in the package."""
    return resources.files("gateway.web").joinpath("index.html").read_bytes()


def _csp(html: bytes) -> str:
    """A policy allowing exactly the page's own inline script and style (by hash)."""

    def hashes(tag: bytes) -> str:
        blocks = re.findall(rb"<" + tag + rb"[^>]*>(.*?)</" + tag + rb">", html, flags=re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks
        )

    return (
        f"default-src 'none'; script-src {hashes(b'script')}; style-src {hashes(b'style')}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def _response(status: http.HTTPStatus, body: bytes, headers: list[tuple[str, str]]) -> Response:
    return Response(
        status.value,
        status.phrase,
        Headers([*headers, ("Content-Length", str(len(body))), ("Connection", "close")]),
        body,
    )


class WebServer:
    """Serves the page and accepts WebSocket clients, handing each to ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: Server | None = None
        self._page = page()
        self._page_headers = [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Security-Policy", _csp(self._page)),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("Cache-Control", "no-cache"),
        ]

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on ``host:port`` (HTTPS and WSS with ``ssl_context``); the bound port."""
        self._server = await serve(
            self._handler,
            host,
            port,
            process_request=self._route,
            # Chat lines are short, and zlib state per connection costs more memory than
            # compression would save.
            compression=None,
            server_header=None,
            open_timeout=OPEN_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            max_size=MAX_MESSAGE_BYTES,
            max_queue=MAX_QUEUED_FRAMES,
            ssl=ssl_context,
            logger=_library_log,
            backlog=BACKLOG,
            reuse_address=True,
        )
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    def close(self) -> None:
        """Stop accepting. Open connections are left to their sessions: the gateway's
        shutdown tells each client to reconnect and closes it, as it does on TCP."""
        if self._server is not None:
            self._server.close(close_connections=False)

    async def wait_closed(self) -> None:
        """Wait until every connection's handler has returned."""
        if self._server is not None:
            await self._server.wait_closed()

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == WS_PATH:
            return None  # on to the WebSocket handshake
        if path == "/":
            return _response(http.HTTPStatus.OK, self._page, self._page_headers)
        return _response(
            http.HTTPStatus.NOT_FOUND,
            b"not found: the chat page is at /, its WebSocket at /ws\n",
            [("Content-Type", "text/plain; charset=utf-8")],
        )
