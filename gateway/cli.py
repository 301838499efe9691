"""``chat-gateway``: run one gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from broker import BrokerError, connect
from gateway.batching import BUSY_RATE
from gateway.config import GatewayConfig
from gateway.errors import StartupError, TlsError
from gateway.server import Gateway
from gateway.tls import quiet_handshake_failures, server_tls

log = logging.getLogger("gateway")


#: What --log-format takes: text for people, json for log collectors (one object a line).
LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (ISO 8601, UTC), level, logger,
    message, the gateway's id, and the traceback (``exc_info``) when there is one. Any
    line break in a message or traceback is escaped by JSON, so a record stays one line."""

    def __init__(self, gateway_id: str) -> None:
        super().__init__()
        self._gateway_id = gateway_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "gateway": self._gateway_id,
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, gateway_id: str, log_format: str = "text") -> None:
    """One line per event on stderr, each naming the gateway (several share a terminal);
    with ``log_format`` json, one JSON object per line instead."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(gateway_id))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s [{gateway_id}] %(name)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _keepalive(value: str) -> tuple[int, int, int]:
    try:
        idle, interval, count = (int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter("expected three whole numbers: IDLE,INTERVAL,COUNT") from None
    if min(idle, interval, count) < 1:
        raise click.BadParameter("each of IDLE,INTERVAL,COUNT must be at least 1")
    return idle, interval, count


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (faster I/O for many sockets), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


async def serve(config: GatewayConfig) -> None:
    """Run a gateway until SIGTERM or SIGINT, then drain it; with TLS, SIGHUP reloads
    its certificate and key."""
    # A certificate that cannot be served stops the start here, before any wait for Redis.
    tls = server_tls(config)
    broker = await connect(config.redis_url, config.redis_wait)
    if not config.redis_url:
        log.info(
            "no Redis configured (--redis-url or REDIS_URL): running alone on the embedded "
            "in-process broker"
        )
    gateway = Gateway(config, broker, tls)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.request_stop)
    if tls is not None:
        # Renewed certificates: new handshakes get them, nobody connected is dropped.
        loop.add_signal_handler(signal.SIGHUP, tls.reload)
        quiet_handshake_failures(loop)
    await gateway.run()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--host", envvar="CHAT_HOST", show_envvar=True, default="0.0.0.0", help="Address to listen on."
)
@click.option(
    "--port",
    envvar="CHAT_PORT",
    show_envvar=True,
    default=5555,
    type=click.IntRange(0, 65535),
    help="TCP port to listen on (0: any free port).",
)
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    show_envvar=True,
    default=None,
    help="Redis to share the room through, e.g. redis://:PASSWORD@host:6379/0. "
    "Without it the gateway runs alone on an embedded in-process broker.",
)
@click.option(
    "--gateway-id",
    envvar="CHAT_GATEWAY_ID",
    show_envvar=True,
    default=None,
    help="This gateway's id in the cluster.  [default: HOSTNAME-PID]",
)
@click.option(
    "--health-port",
    envvar="CHAT_HEALTH_PORT",
    show_envvar=True,
    default=None,
    type=click.IntRange(0, 65535),
    help="Serve GET /health on this port (200 while connected to Redis, else 503), and "
    "GET /metrics (Prometheus).  [default: off]",
)
@click.option(
    "--tls-port",
    envvar="CHAT_TLS_PORT",
    show_envvar=True,
    default=None,
    type=click.IntRange(0, 65535),
    help="Also serve the chat over TLS on this port (6697 is the custom: IRC's TLS port "
    "beside 6667; 0: any free port). Needs --tls-cert and --tls-key.  [default: off]",
)
@click.option(
    "--tls-cert",
    envvar="CHAT_TLS_CERT",
    show_envvar=True,
    default=None,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="PEM certificate for --tls-port and for HTTPS on --web-port, followed by its "
    "chain's intermediates if any. Read at start and again on SIGHUP.",
)
@click.option(
    "--tls-key",
    envvar="CHAT_TLS_KEY",
    show_envvar=True,
    default=None,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="The certificate's PEM private key, unencrypted. Read at start and again on SIGHUP.",
)
@click.option(
    "--web-port",
    envvar="CHAT_WEB_PORT",
    show_envvar=True,
    default=None,
    type=click.IntRange(0, 65535),
    help="Serve the chat web page (GET /) and the line protocol over WebSocket (/ws) on "
    "this port; HTTPS and WSS with --tls-cert and --tls-key.  [default: off]",
)
@click.option(
    "--redis-wait",
    envvar="CHAT_REDIS_WAIT",
    show_envvar=True,
    default=30.0,
    type=click.FloatRange(0),
    help="Seconds to keep trying at start-up while Redis is unreachable or the gateway id "
    "is still held by a previous run, before giving up.",
)
@click.option(
    "--history",
    envvar="CHAT_HISTORY",
    show_envvar=True,
    default=20,
    type=click.IntRange(0, 100),
    help="Messages shown to a user on joining (0: none); also what a bare /history shows.",
)
@click.option(
    "--notice-limit",
    envvar="CHAT_NOTICE_LIMIT",
    show_envvar=True,
    default=200,
    type=click.IntRange(0),
    help="Users on this gateway past which joins and leaves are summarised once a second "
    "(0: always announced one by one).",
)
@click.option(
    "--rate-limit",
    envvar="CHAT_RATE_LIMIT",
    show_envvar=True,
    default=10.0,
    type=click.FloatRange(0),
    help="Lines a second taken in from one client; faster input waits its turn, in order, "
    "and is never dropped (0: no limit).",
)
@click.option(
    "--rate-burst",
    envvar="CHAT_RATE_BURST",
    show_envvar=True,
    default=20,
    type=click.IntRange(1),
    help="Lines taken in from one client at once before the rate applies.",
)
@click.option(
    "--batch-window",
    envvar="CHAT_BATCH_WINDOW",
    show_envvar=True,
    default=0.02,
    type=click.FloatRange(0, 1),
    help="Seconds a busy room's lines (over --batch-rate messages a second) wait, at most, "
    "to go out together, and the gateway's messages to Redis likewise when its users send "
    "over that rate in all: fewer writes under load (0: every line goes out at once).",
)
@click.option(
    "--batch-rate",
    envvar="CHAT_BATCH_RATE",
    show_envvar=True,
    default=BUSY_RATE,
    type=click.FloatRange(min=0, min_open=True),
    help="Messages a second above which a room, or a gateway's publishing, is busy and "
    "goes out once per --batch-window: lower, less CPU per line under load, each line up "
    "to a window later.",
)
@click.option(
    "--max-clients",
    envvar="CHAT_MAX_CLIENTS",
    show_envvar=True,
    default=10_000,
    type=click.IntRange(0),
    help="Connections this gateway accepts (0: no limit).",
)
@click.option(
    "--max-per-address",
    envvar="CHAT_MAX_PER_ADDRESS",
    show_envvar=True,
    default=256,
    type=click.IntRange(0),
    help="Connections accepted from one client address (0: no limit).",
)
@click.option(
    "--keepalive",
    envvar="CHAT_KEEPALIVE",
    show_envvar=True,
    default="60,10,3",
    callback=lambda _ctx, _param, value: _keepalive(value),
    metavar="IDLE,INTERVAL,COUNT",
    help="TCP keepalive on client connections, seconds and probes: a client whose host "
    "vanished is announced as left within IDLE + INTERVAL * COUNT seconds.",
)
@click.option(
    "--log-level",
    envvar="CHAT_LOG_LEVEL",
    show_envvar=True,
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option(
    "--log-format",
    envvar="CHAT_LOG_FORMAT",
    show_envvar=True,
    default="text",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    help="text: one readable line per event; json: one JSON object per line (time, level, "
    "logger, message, gateway, exc_info), for log collectors.",
)
@click.version_option(package_name="chat-service")
def main(
    host: str,
    port: int,
    redis_url: str | None,
    gateway_id: str | None,
    health_port: int | None,
    tls_port: int | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    web_port: int | None,
    redis_wait: float,
    history: int,
    notice_limit: int,
    rate_limit: float,
    rate_burst: int,
    batch_window: float,
    batch_rate: float,
    max_clients: int,
    max_per_address: int,
    keepalive: tuple[int, int, int],
    log_level: str,
    log_format: str,
) -> None:
    """Run a chat gateway: a TCP server for the line protocol (see PROTOCOL.md) that shares
    one chat room with every other gateway on the same Redis, and with --tls-port the same
    protocol over TLS. SIGTERM drains it; SIGHUP reloads the TLS certificate and key."""
    config = GatewayConfig(
        host=host,
        port=port,
        redis_url=redis_url or None,
        gateway_id=gateway_id or "",
        redis_wait=redis_wait,
        health_port=health_port,
        tls_port=tls_port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        web_port=web_port,
        history=history,
        notice_limit=notice_limit,
        rate_limit=rate_limit,
        rate_burst=rate_burst,
        batch_window=batch_window,
        batch_rate=batch_rate,
        max_clients=max_clients,
        max_per_address=max_per_address,
        keepalive_idle=keepalive[0],
        keepalive_interval=keepalive[1],
        keepalive_count=keepalive[2],
    )
    if problem := config.tls_problem():
        raise click.UsageError(problem)
    configure_logging(log_level, config.resolved_id(), log_format.lower())
    try:
        run_loop(serve(config))
    except (StartupError, TlsError, BrokerError) as exc:
        log.error("%s", exc)
        sys.exit(1)
