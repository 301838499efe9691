"""Gateway settings, with the defaults that suit a deployment."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


def default_gateway_id() -> str:
    """Host name and process id: unique per process on a host, and per container."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 5555
    #: None: run alone on the embedded in-process broker.
    redis_url: str | None = None
    gateway_id: str = ""
    #: Port of the HTTP health endpoint (GET /health); None: no endpoint.
    health_port: int | None = None
    #: Messages a new user is shown on joining (0: none); also what a bare /history shows.
    history: int = 20
    #: Local members past which others' joins and leaves are summarised once a second
    #: instead of announced one by one (0: never): keeps join storms linear.
    notice_limit: int = 200
    #: Lines a second taken in from one client (0: no limit), and how many at once. A
    #: person types far below 10 a second; 20 at once covers a pasted paragraph. Faster
    #: input is not dropped: it waits, unread, until the client's turn comes again.
    rate_limit: float = 10.0
    rate_burst: int = 20
    #: Connections this gateway accepts (0: no limit) and per client address (0: no limit).
    #: Generous per address: a classroom or an office shares one NAT address.
    max_clients: int = 10_000
    max_per_address: int = 256
    #: TCP keepalive on client connections: first probe after ``keepalive_idle`` seconds of
    #: silence, then every ``keepalive_interval``; after ``keepalive_count`` unanswered probes
    #: the kernel drops the connection and the user is announced as left. A client whose host
    #: vanished is thus gone within idle + interval * count seconds (90 s by default), and
    #: within that time too if data was waiting for it (TCP_USER_TIMEOUT).
    keepalive_idle: int = 60
    keepalive_interval: int = 10
    keepalive_count: int = 3
    #: Seconds between liveness renewals (and reaps of dead peers).
    heartbeat_interval: float = 1.0
    #: Seconds a gateway stays "live" without renewing. A SIGKILLed gateway's users are
    #: announced as left at most ``liveness_ttl + heartbeat_interval`` after its death;
    #: five missed renewals are needed before a merely busy gateway is declared dead.
    liveness_ttl: float = 5.0
    #: Seconds a SIGTERM drain gives Redis to take the last messages and the leaves; the
    #: whole stop then takes at most this plus two seconds for clients' last lines.
    shutdown_grace: float = 5.0
    #: Seconds to keep retrying an unreachable Redis at start-up before giving up.
    redis_wait: float = 30.0

    def resolved_id(self) -> str:
        return self.gateway_id or default_gateway_id()
