"""The gateway's health endpoint: ``GET /health`` over plain HTTP on its own port.

200 while the gateway is registered as live in Redis and subscribed to the bus, 503
otherwise, so a load balancer stops sending new clients to a gateway cut off from Redis.
``GET /stats`` answers a JSON object of counters (users, connections, rooms hosted, bus
messages received), which the benchmark reads; ``GET /metrics`` the gateway's metrics in
the Prometheus text format (:mod:`gateway.metrics`).
``python -m gateway.health [--port P]`` is the matching probe for container health checks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from gateway.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

#: Bytes of request head read at most; a health probe's request is a few dozen.
MAX_REQUEST_BYTES = 2048
#: Seconds a probe connection may take to send its request.
REQUEST_TIMEOUT = 2.0


def _response(
    status: str, body: str | bytes, content_type: str = "text/plain; charset=utf-8"
) -> bytes:
    payload = body.encode() if isinstance(body, str) else body
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload


class HealthServer:
    """Answers every request with the gateway's current health."""

    def __init__(
        self,
        probe: Callable[[], tuple[bool, str]],
        stats: Callable[[], dict[str, Any]] = dict,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        """``metrics``: the Prometheus exposition for ``GET /metrics`` (None: 404 there)."""
        self._probe = probe
        self._stats = stats
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
            path = path.split(b"?", 1)[0]
            if path == b"/stats":
                body = json.dumps(self._stats()) + "\n"
                writer.write(_response("200 OK", body, "application/json; charset=utf-8"))
            elif path == b"/metrics":
                if self._metrics is None:
                    writer.write(_response("404 Not Found", "no metrics here\n"))
                else:
                    writer.write(_response("200 OK", self._metrics(), CONTENT_TYPE))
            else:
                healthy, detail = self._probe()
                status = "200 OK" if healthy else "503 Service Unavailable"
                writer.write(_response(status, detail + "\n"))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a probe that hung up or sent junk gets nothing more
        finally:
            writer.close()


def probe(url: str, timeout: float = REQUEST_TIMEOUT) -> tuple[bool, str]:
    """Ask a health endpoint; (healthy, what it said)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status == 200, reply.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode().strip() or str(exc)
    except (urllib.error.URLError, OSError) as exc:
        return False, str(getattr(exc, "reason", exc))


def main() -> None:
    """``python -m gateway.health [--port P] [--host H]``: exit 0 if healthy, else 1."""
    import click

    @click.command()
    @click.option("--host", default="127.0.0.1")
    @click.option("--port", envvar="CHAT_HEALTH_PORT", default=8080, type=int)
    def check(host: str, port: int) -> None:
        healthy, detail = probe(f"http://{host}:{port}/health")
        click.echo(detail, err=not healthy)
        sys.exit(0 if healthy else 1)

    check()


if __name__ == "__main__":
    main()
