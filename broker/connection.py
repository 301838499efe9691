"""From a Redis URL to the clients of the deployment it names.

Three deployments, one URL option:

* ``redis://``, ``rediss://``, ``unix://``: one Redis server, or any node of a Redis
  Cluster: the server is asked (``INFO cluster``, as Centrifugo does) and a cluster is
  detected by itself (a Cluster node by its TCP address: redis-py's cluster client has no
  Unix sockets);
* ``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``: the primary
  that the Sentinels monitor as SERVICE, followed across failovers;
* no URL: the embedded in-process Redis (fakeredis), for one gateway alone.

Each deployment gives two clients: ``commands``, which may retry a command after a broken
link, and ``bus``, which never does (it carries what must not run twice, and its
subscriptions must break loudly so that the gap is replayed).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff

from broker.errors import BrokerUnavailable
from broker.translate import text

log = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection to Redis before calling it unavailable.
CONNECT_TIMEOUT = 3.0
#: Seconds to wait for any single Redis reply; a stuck Redis must not stall a gateway.
COMMAND_TIMEOUT = 5.0
#: Connections one process opens to Redis (to each node of a cluster) for commands, at most.
MAX_CONNECTIONS = 32
#: Seconds between PINGs on an idle subscription, so a dead link is noticed.
HEALTH_CHECK_INTERVAL = 5
#: Backoff bounds, seconds, while waiting for Redis to answer at start.
RETRY_MIN, RETRY_MAX = 0.1, 2.0

SENTINEL_SCHEME = "redis+sentinel"


class Mode(enum.Enum):
    EMBEDDED = "embedded"
    STANDALONE = "standalone"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


@dataclass(frozen=True, slots=True)
class Connection:
    """The clients of one deployment."""

    mode: Mode
    #: Serves requests; may retry a command after a broken link.
    commands: Any
    #: Never retries: runs what must not run twice, and (but on a cluster) subscribes.
    bus: Any
    description: str
    #: Sentinel only: a client on a replica of the primary.
    replica: Any = None


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    password: str | None


def redact_url(url: str) -> str:
    """``url`` with any password replaced, fit for logs."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return url
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def parse_sentinel_url(url: str) -> SentinelAddress:
    """The Sentinels, service, database and password a ``redis+sentinel://`` URL names;
    :class:`ValueError` saying what is wrong otherwise."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    password = unquote(userinfo.partition(":")[2]) if userinfo else None
    sentinels = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT for each Sentinel, got {item!r}")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("expected /SERVICE or /SERVICE/DB after the Sentinel addresses")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the database must be a number, got {path[1]!r}")
    return SentinelAddress(
        tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2 else 0, password or None
    )


_COMMON: dict[str, Any] = {
    "socket_connect_timeout": CONNECT_TIMEOUT,
    "socket_timeout": COMMAND_TIMEOUT,
    "socket_keepalive": True,
    "health_check_interval": HEALTH_CHECK_INTERVAL,
}


def _options(url: str) -> dict[str, Any]:
    """The connection options for ``url``: TCP keepalive only where there is TCP (redis-py
    refuses the option on a Unix socket)."""
    if urlsplit(url).scheme == "unix":
        return {k: v for k, v in _COMMON.items() if k != "socket_keepalive"}
    return _COMMON


def _retrying() -> Retry:
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)


def _never_retrying() -> Retry:
    return Retry(NoBackoff(), 0)


def standalone(url: str) -> Connection:
    """The clients of one Redis server at ``url``. Nothing is contacted yet."""
    try:
        # A bounded pool that waits for a free connection: a login storm queues its
        # claims here instead of opening a connection each (or failing past a cap).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=COMMAND_TIMEOUT,
            retry=_retrying(),
            **_options(url),
        )
        commands = aioredis.Redis.from_pool(pool)
        bus = aioredis.Redis.from_url(url, retry=_never_retrying(), **_options(url))
        # redis-py takes unknown URL options and fails on them only when it first
        # connects; making a connection object (no I/O) finds them now.
        commands.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    except (ValueError, TypeError) as exc:
        raise BrokerUnavailable(f"invalid Redis URL {redact_url(url)!r}: {exc}") from exc
    return Connection(Mode.STANDALONE, commands, bus, f"Redis at {redact_url(url)}")


class QueueingCluster(RedisCluster):
    """A cluster client whose commands wait their turn once ``MAX_CONNECTIONS`` are in
    flight, as the one-Redis pool does (a login storm queues), where redis-py's cluster
    client would fail the next one with MaxConnectionsError."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Held while a command is in flight; :mod:`broker.durable` takes it too.
        self.turns = asyncio.Semaphore(MAX_CONNECTIONS)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turns:
            return await super().execute_command(*args, **kwargs)


def _cluster(url: str) -> Connection:
    common = {k: v for k, v in _COMMON.items() if k != "health_check_interval"}
    # Per node: the turns bound what is in flight in all; pipelines and the bus's
    # subscriptions come on top.
    per_node = 2 * MAX_CONNECTIONS
    commands = QueueingCluster.from_url(url, max_connections=per_node, retry=_retrying(), **common)
    bus = QueueingCluster.from_url(url, max_connections=per_node, retry=_never_retrying(), **common)
    return Connection(Mode.CLUSTER, commands, bus, f"Redis Cluster at {redact_url(url)}")


async def _connect_in_sync(connection: Any) -> None:
    """Set up a connection of the replica pool (Sentinel): to a replica whose link to its
    primary is up, or to the primary itself (the pool's last resort); any other node is
    passed over (a ``ConnectionError`` makes the pool try the next one). Sentinel goes on
    listing a killed primary that comes back as a replica for some ten seconds before it
    makes it one, while it is still an empty primary: room traffic read there, or a gap
    replayed from there, would be nothing."""
    await connection.on_connect()
    await connection.send_command("ROLE")
    role = await connection.read_response()
    kind = text(role[0])
    if kind == "slave" and text(role[3]) == "connected":
        return
    if kind == "master":
        primary = await connection.connection_pool.get_master_address()
        if (connection.host, int(connection.port)) == (primary[0], int(primary[1])):
            return
    where = f"{connection.host}:{connection.port}"
    raise redis.exceptions.ConnectionError(f"{where} is not a replica in sync ({kind})")


def sentinel(url: str) -> Connection:
    """The clients of the primary that the Sentinels in ``url`` monitor, and of one of its
    replicas. Nothing is contacted yet."""
    try:
        address = parse_sentinel_url(url)
    except ValueError as exc:
        raise BrokerUnavailable(f"invalid Redis URL {redact_url(url)!r}: {exc}") from exc
    watch = Sentinel(  # type: ignore[no-untyped-call]
        list(address.sentinels),
        sentinel_kwargs={
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": COMMAND_TIMEOUT,
            "password": address.password,
            # One Sentinel not answering is no reason to wait: the next one is asked.
            "retry": _never_retrying(),
        },
        password=address.password,
        db=address.db,
        **_COMMON,
    )
    commands = watch.master_for(address.service, max_connections=MAX_CONNECTIONS, retry=_retrying())
    bus = watch.master_for(address.service, retry=_never_retrying())
    replica = watch.slave_for(
        address.service, retry=_never_retrying(), redis_connect_func=_connect_in_sync
    )
    return Connection(
        Mode.SENTINEL,
        commands,
        bus,
        f"Redis service {address.service!r} through Sentinel at "
        + ",".join(f"{h}:{p}" for h, p in address.sentinels),
        replica,
    )


def embedded() -> Connection:
    """An in-process Redis: one gateway alone, nothing to install."""
    import fakeredis

    server = fakeredis.FakeServer()
    return Connection(
        Mode.EMBEDDED,
        fakeredis.FakeAsyncRedis(server=server),
        fakeredis.FakeAsyncRedis(server=server),
        "embedded in-process broker",
    )


async def _is_cluster(url: str) -> bool:
    probe = aioredis.Redis.from_url(url, retry=_never_retrying(), **_options(url))
    try:
        info = await probe.info("cluster")
    finally:
        await probe.aclose()
    return str(info.get("cluster_enabled", "0")) == "1"


async def open_url(url: str, wait: float = 0.0) -> Connection:
    """The clients of the deployment at ``url``, detected by asking it; ``wait`` seconds at
    most for it to answer. :class:`BrokerUnavailable` if it does not, or the URL is bad."""
    if urlsplit(url).scheme == SENTINEL_SCHEME:
        return sentinel(url)
    checked = standalone(url)  # validates the URL before any I/O
    await checked.commands.aclose()
    await checked.bus.aclose()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = RETRY_MIN
    while True:
        try:
            clustered = await _is_cluster(url)
            break
        except (redis.exceptions.RedisError, OSError) as exc:
            if loop.time() + delay > deadline:
                raise BrokerUnavailable(
                    f"cannot reach Redis at {redact_url(url)}: {str(exc) or type(exc).__name__}"
                ) from exc
            log.warning("waiting for Redis at %s: %s", redact_url(url), exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)
    if not clustered:
        return standalone(url)
    if urlsplit(url).scheme == "unix":  # redis-py's cluster client speaks TCP only
        raise BrokerUnavailable(
            f"{redact_url(url)} is a Redis Cluster node: give a node's redis:// address, "
            "not its socket"
        )
    try:
        connection = _cluster(url)
        await connection.commands.initialize()
        await connection.bus.initialize()
    except (redis.exceptions.RedisError, OSError) as exc:
        raise BrokerUnavailable(f"cannot read the Redis Cluster's slots: {exc}") from exc
    log.info("Redis at %s is a Redis Cluster node: using the cluster", redact_url(url))
    return connection
