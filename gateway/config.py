"""Gateway settings, with the defaults that suit a deployment."""

from __future__ import annotations

import os
import secrets
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from gateway.batching import BUSY_RATE

#: Docker's embedded DNS server, which every container on a user-defined network (Compose
#: always makes one) finds in its /etc/resolv.conf. It answers a reverse lookup of a
#: container's address with the container's name.
DOCKER_DNS = "127.0.0.11"
#: Seconds to wait for its answer; it is in the container's own network namespace.
DOCKER_DNS_TIMEOUT = 0.5
#: Bytes of a DNS answer read at most (the classic UDP limit; a PTR answer is ~100).
MAX_DNS_REPLY = 512
_PTR, _IN = 12, 1


def default_gateway_id(resolv_conf: Path = Path("/etc/resolv.conf")) -> str:
    """The container's name in a Docker container (``chat-service-gateway-2``, as `docker
    ps` shows it and `docker stop` takes it); elsewhere host name and process id. Either is
    unique per process on a host and per container."""
    if DOCKER_DNS in _nameservers(resolv_conf):
        try:
            address = socket.gethostbyname(socket.gethostname())
            name = reverse_lookup(address, (DOCKER_DNS, 53))
        except (OSError, ValueError):
            name = None
        if name:
            return name
    return f"{socket.gethostname()}-{os.getpid()}"


def _nameservers(resolv_conf: Path) -> list[str]:
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        return []
    return [f[1] for f in (line.split() for line in lines) if len(f) > 1 and f[0] == "nameserver"]


def reverse_lookup(
    address: str, server: tuple[str, int], timeout: float = DOCKER_DNS_TIMEOUT
) -> str | None:
    """The first label of the name ``server`` gives IPv4 ``address`` (a PTR query over
    UDP), or None if it has none. Asked of the DNS server directly: the C library's lookup
    would answer from /etc/hosts, where Docker maps the address to the container's id.
    Raises OSError if the server does not answer, ValueError if the answer is malformed."""
    query_id = secrets.randbelow(1 << 16)
    qname = b"".join(
        bytes([len(label)]) + label
        for label in [*reversed(address.encode().split(b".")), b"in-addr", b"arpa"]
    )
    question = qname + b"\0" + struct.pack("!HH", _PTR, _IN)
    query = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect(server)
        sock.send(query)
        reply = sock.recv(MAX_DNS_REPLY)
    if len(reply) < 12:
        raise ValueError("short DNS reply")
    reply_id, flags, _qd, answers, _ns, _ar = struct.unpack("!HHHHHH", reply[:12])
    if reply_id != query_id or not flags & 0x8000:
        raise ValueError("not the answer to our query")
    if flags & 0x000F or not reply[12:].startswith(question):
        return None  # NXDOMAIN or another error: no name for this address
    offset = 12 + len(question)
    for _ in range(answers):
        offset = _skip_name(reply, offset)
        rtype, _rclass, _ttl, length = struct.unpack("!HHIH", reply[offset : offset + 10])
        offset += 10
        if rtype == _PTR:
            return _first_label(reply, offset) or None
        offset += length
    return None


def _skip_name(message: bytes, offset: int) -> int:
    """The offset just past the (possibly compressed) name at ``offset``."""
    while True:
        if offset >= len(message):
            raise ValueError("truncated name")
        length = message[offset]
        if length >= 0xC0:
            return offset + 2
        offset += 1 + length
        if length == 0:
            return offset


def _first_label(message: bytes, offset: int) -> str:
    """The first label of the (possibly compressed) name at ``offset``."""
    for _ in range(16):  # pointers chained this deep are malformed
        if offset >= len(message):
            raise ValueError("truncated name")
        length = message[offset]
        if length < 0xC0:
            label = message[offset + 1 : offset + 1 + length]
            if len(label) != length:
                raise ValueError("truncated name")
            return label.decode("ascii", errors="replace")
        offset = ((length & 0x3F) << 8) | message[offset + 1]
    raise ValueError("name pointer loop")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 5555
    #: None: run alone on the embedded in-process broker.
    redis_url: str | None = None
    gateway_id: str = ""
    #: Port of the HTTP health endpoint (GET /health); None: no endpoint.
    health_port: int | None = None
    #: Port of a second listener serving the same protocol over TLS (None: none), and the
    #: PEM certificate (chain) and unencrypted key it serves, read again on SIGHUP.
    tls_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Port of the web page (GET /) and its WebSocket (/ws); None: no web port.
    web_port: int | None = None
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
    #: Seconds a busy room's lines (over ``batch_rate`` messages a second) may wait to go
    #: out to its members together, and this gateway's messages to Redis likewise when its
    #: users send over that rate in all (0: everything goes out at once).
    batch_window: float = 0.02
    batch_rate: float = BUSY_RATE
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
    #: announced as left at most ``liveness_ttl + heartbeat_interval`` after its death
    #: (one ``liveness_ttl`` more if Redis was unreachable meanwhile: broker.scripts);
    #: five missed renewals are needed before a merely busy gateway is declared dead.
    liveness_ttl: float = 5.0
    #: Seconds a SIGTERM drain gives Redis to take the last messages and the leaves; the
    #: whole stop then takes at most this plus two seconds for clients' last lines.
    shutdown_grace: float = 5.0
    #: Seconds to keep retrying an unreachable Redis at start-up before giving up.
    redis_wait: float = 30.0

    def resolved_id(self) -> str:
        return self.gateway_id or default_gateway_id()

    def tls_problem(self) -> str | None:
        """What is wrong with the TLS settings, in one line for the operator; None if
        nothing is (TLS off, or a certificate and key for the TLS port, the web port
        serving HTTPS, or both)."""
        missing = [
            flag
            for flag, value in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key))
            if value is None
        ]
        if self.tls_port is None:
            if len(missing) == 2:
                return None
            if self.web_port is None:
                return "--tls-cert and --tls-key are for --tls-port or --web-port, neither is set"
            if missing:
                return f"HTTPS on --web-port needs {' and '.join(missing)} too"
            return None
        if missing:
            return f"--tls-port needs {' and '.join(missing)}"
        if self.tls_port == self.port != 0:
            return f"--tls-port and --port are both {self.port}: TLS needs a port of its own"
        return None
