"""Real Redis deployments on loopback for integration tests: a Redis Cluster, and a primary
with a replica watched by three Sentinels.

Each ``redis-server`` runs in a working directory of its own that outlives a kill (so that a
restarted cluster node finds its ``nodes.conf`` again), without persistence, on free loopback
ports. Every wait is for an event (a log line, a process exit, a command's reply reaching a
state) bounded by a multiple of ``T``; where polling Redis is the only way to see the state,
the poll is a short loop inside such a bound.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.crc import key_slot

from tests.support import LogWatcher, T, free_port

HOST = "127.0.0.1"
SLOTS = 16384

#: How often a poll of Redis state asks again.
POLL = 0.05

#: Replies that mean "not yet" while a node starts, loads a full sync, or dies under us.
NOT_YET = (rexc.BusyLoadingError, rexc.ConnectionError, rexc.TimeoutError, OSError)


def slot_of(key: str) -> int:
    """The cluster slot of ``key``: CRC16 (XMODEM) of its hash tag (``{...}``), or of the
    whole key if it has none, modulo 16384."""
    return key_slot(key.encode())


def room_log_key(room: str) -> str:
    """A room's stream key as the project spells it: the room name is the hash tag."""
    return f"chat:room:{{{room}}}:log"


async def poll(
    probe: Callable[[], Awaitable[Any]],
    timeout: float,
    what: str,
    logs: Iterable[RedisNode] = (),
    every: float = POLL,
) -> Any:
    """Ask ``probe`` again every ``every`` seconds until it returns something true (which is
    returned), for at most ``timeout`` seconds. "Not yet" errors from Redis count as false.
    On timeout the assertion error shows the end of the ``logs`` of those processes."""
    last: BaseException | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    if result := await probe():
                        return result
                except NOT_YET as exc:
                    last = exc
                await asyncio.sleep(every)
    except TimeoutError:
        tails = "".join(f"\n--- {node} ---\n{node.tail()}" for node in logs)
        raise AssertionError(
            f"not within {timeout:g}s: {what} (last error: {last!r}){tails}"
        ) from None


class RedisNode:
    """One ``redis-server`` process (a cluster node, a primary, a replica or a Sentinel) on a
    free loopback port, in a temp dir of its own. ``kill`` leaves port and dir for a
    ``start`` again; ``close`` removes the dir."""

    def __init__(self, label: str, args: Callable[[RedisNode], list[str]], ready: str) -> None:
        self.label = label
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"chat-{label}-")
        self.proc: asyncio.subprocess.Process | None = None
        self.log: LogWatcher | None = None
        #: The cluster node id (``CLUSTER MYID``); empty outside a cluster.
        self.id = ""
        self._args = args
        self._ready = ready

    def __repr__(self) -> str:
        return f"<{self.label} :{self.port}>"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        """Start (or start again, on the same port and dir) and wait until it serves."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: the integration tests need it")
        assert not self.alive, f"{self} is running already"
        self.proc = await asyncio.create_subprocess_exec(
            exe, *self._args(self),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.log = LogWatcher(self.proc.stdout, f"{self.label} :{self.port}")
        await self.log.wait_for(self._ready)

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines this process logged (since its latest start)."""
        return "\n".join(self.log.lines[-lines:]) if self.log is not None else "(not started)"

    def client(self, **kwargs: Any) -> aioredis.Redis:
        """A plain client of this one process (close it with ``aclose``)."""
        kwargs.setdefault("decode_responses", True)
        kwargs.setdefault("socket_timeout", T)
        kwargs.setdefault("socket_connect_timeout", T)
        kwargs.setdefault("retry", None)  # a poll asks again by itself
        return aioredis.Redis(host=HOST, port=self.port, **kwargs)

    async def call(self, *args: Any) -> Any:
        """One command's reply, on a connection of its own (no response callbacks apply to
        multi-word commands given as separate arguments: ``call("CLUSTER", "NODES")`` is the
        raw text)."""
        async with self.client() as r:
            return await r.execute_command(*args)  # type: ignore[no-untyped-call]

    async def info(self, section: str) -> dict[str, Any]:
        async with self.client() as r:
            result: dict[str, Any] = await r.info(section)
            return result

    async def role(self) -> str:
        """``master``, ``slave`` or ``sentinel``, as the process says of itself."""
        reply = await self.call("ROLE")
        return str(reply[0])

    async def kill(self) -> None:
        """SIGKILL, as a crash would, and wait until the process has exited."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            async with asyncio.timeout(2 * T):
                await self.proc.wait()
        if self.log is not None:
            await self.log.close()

    async def close(self) -> None:
        await self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


async def closed_on_failure(
    start: Coroutine[Any, Any, None], close: Callable[[], Awaitable[None]]
) -> None:
    """Await ``start``; if it fails, ``close()`` what it may have started, then re-raise."""
    try:
        await start
    except BaseException:
        await close()
        raise


def _server_args(node: RedisNode) -> list[str]:
    return [
        "--port", str(node.port), "--bind", HOST, "--save", "", "--appendonly", "no",
        "--dir", node.dir, "--daemonize", "no",
        # A replica's full sync starts at once, not after the default 5 s wait for others.
        "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip


# -- Redis Cluster ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeEntry:
    """One line of ``CLUSTER NODES``."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    #: Slot ranges as printed (``0-5460``, ``7000``), migration markers left out.
    slots: tuple[str, ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "pfail", "handshake", "noaddr"})

    def slot_set(self) -> set[int]:
        owned: set[int] = set()
        for part in self.slots:
            first, _, last = part.partition("-")
            owned.update(range(int(first), int(last or first) + 1))
        return owned

    @classmethod
    def parse_all(cls, text: str) -> list[NodeEntry]:
        entries = []
        for line in text.splitlines():
            if not line.strip():
                continue
            fields = line.split()
            address = fields[1].split("@")[0]
            entries.append(
                cls(
                    id=fields[0],
                    port=int(address.rsplit(":", 1)[1] or 0),
                    flags=frozenset(fields[2].split(",")),
                    master_id=None if fields[3] == "-" else fields[3],
                    slots=tuple(s for s in fields[8:] if not s.startswith("[")),
                )
            )
        return entries


def _cluster_info(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


class ClusterFixture:
    """A real Redis Cluster on loopback: ``primaries`` primaries with ``replicas`` replicas
    each, made by ``redis-cli --cluster create``, with a node timeout of one second so that a
    failover takes about two.

    ``nodes`` are ``RedisNode``\\s (``.port``, ``.url``, ``.proc``, ``.log``, ``.id``) in the
    order given to ``redis-cli``: the primaries first. Which node is a primary changes with
    failovers: ask ``primaries()``.
    """

    NODE_TIMEOUT_MS = 1000

    def __init__(self, primaries: int = 3, replicas: int = 0) -> None:
        assert primaries >= 3, "redis-cli --cluster create wants at least 3 primaries"
        self.primary_count = primaries
        self.replica_count = replicas
        self.nodes = [
            RedisNode(f"cluster-node-{n}", self._node_args, r"Ready to accept connections")
            for n in range(primaries * (1 + replicas))
        ]
        self._bus_ports = {node.port: free_port() for node in self.nodes}
        #: Slots each killed primary owned when it was killed.
        self._slots_at_kill: dict[int, set[int]] = {}

    def _node_args(self, node: RedisNode) -> list[str]:
        return [
            *_server_args(node),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
            # The bus port defaults to port + 10000, which may be taken or past 65535.
            "--cluster-port", str(self._bus_ports[node.port]),
        ]  # fmt: skip

    @property
    def url(self) -> str:
        """The first node's URL: a cluster client discovers the rest from it."""
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        """Every node's URL, the primaries first: gateways may be pointed at any."""
        return [node.url for node in self.nodes]

    def node_at(self, port: int) -> RedisNode:
        return next(node for node in self.nodes if node.port == port)

    async def start(self) -> None:
        """Start every node, create the cluster, and wait until every node agrees on the
        whole of it: all slots served, every primary with its replicas attached and synced.
        If that fails, every node is closed again: none outlives the failed test."""
        await closed_on_failure(self._start(), self.close)

    async def _start(self) -> None:
        await asyncio.gather(*(node.start() for node in self.nodes))
        for node in self.nodes:
            node.id = await node.call("CLUSTER", "MYID")
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed: the cluster tests need it")
        proc = await asyncio.create_subprocess_exec(
            cli, "--cluster", "create", *(f"{HOST}:{node.port}" for node in self.nodes),
            "--cluster-replicas", str(self.replica_count), "--cluster-yes",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        async with asyncio.timeout(6 * T):
            out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out.decode()}")
        await self.wait_healthy(timeout=6 * T)

    # -- state --------------------------------------------------------------------------------

    async def _view(self, node: RedisNode) -> list[NodeEntry]:
        return NodeEntry.parse_all(await node.call("CLUSTER", "NODES"))

    async def _any_view(self) -> list[NodeEntry]:
        """``CLUSTER NODES`` as the first live node that answers sees it."""
        last: BaseException | None = None
        for node in self.nodes:
            if node.alive:
                try:
                    return await self._view(node)
                except NOT_YET as exc:
                    last = exc
        raise AssertionError(f"no cluster node answers (last error: {last!r})")

    async def _converged(self) -> dict[int, tuple[str, int | None, tuple[str, ...]]] | None:
        """The topology (port -> role, its primary's port, slots) of the live nodes if every
        live node sees the same one, with no live node flagged failing, every node reporting
        ``cluster_state:ok`` with all slots assigned, and every replica's link up; else None."""
        live = [node for node in self.nodes if node.alive]
        ports = {node.port for node in live}
        agreed = None
        for node in live:
            info = _cluster_info(await node.call("CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_assigned") != str(
                SLOTS
            ):
                return None
            entries = await self._view(node)
            port_of = {e.id: e.port for e in entries}
            seen = {}
            for e in entries:
                if e.port in ports:
                    if e.failing:
                        return None
                    master = port_of.get(e.master_id) if e.master_id else None
                    seen[e.port] = ("master" if e.is_master else "slave", master, e.slots)
            if set(seen) != ports or (agreed is not None and seen != agreed):
                return None
            agreed = seen
            if seen[node.port][0] == "slave":
                replication = await node.info("replication")
                if replication.get("master_link_status") != "up":
                    return None
        return agreed

    async def wait_healthy(self, timeout: float = 4 * T) -> None:
        """Wait until every live node agrees on the topology (see ``_converged``) and it has
        ``primaries`` primaries owning slots, each with as many live replicas as were asked
        for (fewer only where a node is down)."""
        down = sum(not node.alive for node in self.nodes)

        async def probe() -> bool:
            topology = await self._converged()
            if topology is None:
                return False
            owners = [p for p, (role, _, slots) in topology.items() if role == "master" and slots]
            if len(owners) != self.primary_count:
                return False
            attached = sum(
                role == "slave" and master in owners for role, master, _ in topology.values()
            )
            if attached < self.primary_count * self.replica_count - down:
                return False
            # What clients are told (CLUSTER SLOTS: primary, then replicas, per slot range)
            # lists those replicas too, on every node: a client reading from replicas finds
            # them from the start.
            for node in self.nodes:
                if node.alive and not down:
                    slots = await node.call("CLUSTER", "SLOTS")
                    if any(len(entry) - 3 < self.replica_count for entry in slots):
                        return False
            return True

        await poll(probe, timeout, "the cluster is healthy and every node agrees", self.nodes)

    async def primaries(self) -> list[RedisNode]:
        """The live nodes that are primaries owning slots now, as the cluster sees it."""
        entries = await self._any_view()
        ports = {e.port for e in entries if e.is_master and e.slots and not e.failing}
        return [node for node in self.nodes if node.port in ports and node.alive]

    async def replicas_of(self, primary: RedisNode) -> list[RedisNode]:
        """The nodes the cluster sees replicating ``primary`` now."""
        entries = await self._any_view()
        ports = {e.port for e in entries if e.master_id == primary.id}
        return [node for node in self.nodes if node.port in ports]

    async def slot_owners(self, via: RedisNode | None = None) -> dict[int, RedisNode]:
        """Slot -> the primary that owns it, from ``CLUSTER SLOTS`` (of ``via``, or of the
        first live node)."""
        nodes = [via] if via is not None else [n for n in self.nodes if n.alive]
        for node in nodes:
            try:
                ranges = await node.call("CLUSTER", "SLOTS")
            except NOT_YET:
                continue
            owners: dict[int, RedisNode] = {}
            for first, last, master, *_ in ranges:
                owner = self.node_at(int(master[1]))
                owners.update(dict.fromkeys(range(int(first), int(last) + 1), owner))
            return owners
        raise AssertionError("no cluster node answers CLUSTER SLOTS")

    async def owner_of_slot(self, slot: int) -> RedisNode:
        return (await self.slot_owners())[slot]

    async def owner_of(self, key: str) -> RedisNode:
        """The primary that owns ``key``'s slot now."""
        return await self.owner_of_slot(slot_of(key))

    async def rooms_per_primary(
        self,
        candidates: Iterable[str] | None = None,
        key_of: Callable[[str], str] = room_log_key,
    ) -> dict[RedisNode, str]:
        """One room per primary: the first of ``candidates`` (``#r0``, ``#r1``, ... by
        default) whose key (``key_of(room)``) each primary owns."""
        owners = await self.slot_owners()
        primaries = await self.primaries()
        rooms: dict[RedisNode, str] = {}
        names = candidates if candidates is not None else (f"#r{n}" for n in range(10_000))
        for room in names:
            owner = owners[slot_of(key_of(room))]
            rooms.setdefault(owner, room)
            if len(rooms) == len(primaries):
                return {p: rooms[p] for p in primaries}
        raise AssertionError(f"no candidate room lands on each of {primaries}: {rooms}")

    # -- changes ------------------------------------------------------------------------------

    async def move_slot(self, slot: int, to: RedisNode) -> None:
        """Migrate ``slot``, keys and all, to the primary ``to``, as ``redis-cli --cluster
        reshard`` does: IMPORTING on the target, MIGRATING on the source, MIGRATE the keys
        in batches, then SETSLOT NODE on the target, the source and every other primary.
        Returns once every live node sees ``to`` as the slot's owner."""
        source = await self.owner_of_slot(slot)
        if source is to:
            return
        await to.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
        await source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", to.id)
        while keys := await source.call("CLUSTER", "GETKEYSINSLOT", slot, 100):
            reply = await source.call("MIGRATE", HOST, to.port, "", 0, int(T * 1000), "KEYS", *keys)
            assert reply in ("OK", "NOKEY"), reply
        others = [p for p in await self.primaries() if p not in (source, to)]
        for node in [to, source, *others]:
            await node.call("CLUSTER", "SETSLOT", slot, "NODE", to.id)

        async def moved() -> bool:
            for node in self.nodes:
                if node.alive and (await self.slot_owners(via=node))[slot] is not to:
                    return False
            return True

        await poll(moved, 3 * T, f"every node sees slot {slot} on {to}", self.nodes)

    async def kill(self, node: RedisNode) -> None:
        """SIGKILL ``node`` and wait until it has exited (remembering the slots it owned,
        for ``wait_failover``)."""
        entries = [e for e in await self._any_view() if e.port == node.port]
        self._slots_at_kill[node.port] = entries[0].slot_set() if entries else set()
        await node.kill()

    async def wait_failover(self, old_primary: RedisNode, timeout: float = 6 * T) -> RedisNode:
        """Wait until another node, now ``role:master``, serves every slot the killed
        ``old_primary`` owned, in the view of every live node, each reporting
        ``cluster_state:ok``. Returns the promoted node."""
        slots = self._slots_at_kill.get(old_primary.port)
        assert slots, f"{old_primary} owned no slots when it was killed"
        probe_slot = min(slots)

        async def promoted() -> RedisNode | None:
            heir = None
            for node in self.nodes:
                if not node.alive:
                    continue
                info = _cluster_info(await node.call("CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    return None
                owners = await self.slot_owners(via=node)
                owner = owners[probe_slot]
                if owner is old_primary or (heir is not None and owner is not heir):
                    return None
                if any(owners[s] is not owner for s in slots):
                    return None
                heir = owner
            if heir is None or await heir.role() != "master":
                return None
            return heir

        what = f"a replica of {old_primary} took over"
        heir: RedisNode = await poll(promoted, timeout, what, self.nodes)
        return heir

    async def restart(self, node: RedisNode, timeout: float = 4 * T) -> None:
        """Start a killed node again on its port and dir, and wait until the whole cluster
        agrees on it again: after a failover it rejoins as a replica of the node promoted in
        its stead, synced (``master_link_status:up``)."""
        await node.start()
        await self.wait_healthy(timeout)

    async def close(self) -> None:
        await asyncio.gather(*(node.close() for node in self.nodes))


# -- Redis Sentinel --------------------------------------------------------------------------


class SentinelFixture:
    """A primary, its replica, and three Sentinels watching them as ``service`` (quorum 2,
    failover timeout 5 s, one replica resynced at a time).

    ``down_after_ms`` is 2000, not 1000: a Sentinel pings and reconnects at most once a
    second, so with 1000 a Sentinel that just switched to the promoted replica may find it
    "down" before its new link has answered once, and fail over again, back to the old
    primary if it has restarted by then (seen about once in 20 failovers with Redis 7.0).

    ``primary`` and ``replica`` are the nodes in those roles now: ``kill_primary`` swaps
    them once the Sentinels have promoted the replica, so the killed one is then
    ``replica`` (down until ``restart_old_primary``).
    """

    def __init__(self, service: str = "chat", down_after_ms: int = 2000) -> None:
        self.service = service
        self.down_after_ms = down_after_ms
        self.primary = RedisNode("sentinel-primary", _server_args, r"Ready to accept connections")
        self.replica = RedisNode("sentinel-replica", self._replica_args, r"Ready to accept")
        self.sentinels = [
            RedisNode(f"sentinel-{n}", self._sentinel_args, r"\+monitor master") for n in range(3)
        ]
        self._first_primary_port = self.primary.port

    @property
    def nodes(self) -> list[RedisNode]:
        """Every process: the primary, the replica, the Sentinels."""
        return [self.primary, self.replica, *self.sentinels]

    def _replica_args(self, node: RedisNode) -> list[str]:
        return [*_server_args(node), "--replicaof", HOST, str(self._first_primary_port)]

    def _sentinel_args(self, node: RedisNode) -> list[str]:
        conf = Path(node.dir) / "sentinel.conf"
        if not conf.exists():  # a restarted Sentinel keeps what it rewrote there
            conf.write_text(
                f"port {node.port}\n"
                f"bind {HOST}\n"
                f'dir "{node.dir}"\n'
                "sentinel resolve-hostnames no\n"
                f"sentinel monitor {self.service} {HOST} {self._first_primary_port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 5000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
        return [str(conf), "--sentinel"]

    @property
    def url(self) -> str:
        """``redis+sentinel://`` with every Sentinel, naming the service."""
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """What ``redis.asyncio.sentinel.Sentinel`` takes."""
        return [s.address for s in self.sentinels]

    async def _link_up(self, node: RedisNode) -> bool:
        replication = await node.info("replication")
        return (
            replication.get("role") == "slave"
            and replication.get("master_link_status") == "up"
            and replication.get("master_port") == self.primary.port
        )

    async def _acknowledged(self) -> bool:
        """Whether a write to the primary is acknowledged by a replica within 0.2 s, as
        ``WAIT 1`` counts it."""
        async with self.primary.client() as r:
            await r.set("test:acknowledged", "1")
            return bool(await r.wait(1, 200) >= 1)

    async def start(self) -> None:
        """Start the primary, the replica and the Sentinels; wait until the replica is in sync
        and every Sentinel knows the replica and the two other Sentinels, so that a failover
        can happen. If that fails, every process is closed again."""
        await closed_on_failure(self._start(), self.close)

    async def _start(self) -> None:
        await self.primary.start()
        await self.replica.start()
        await poll(lambda: self._link_up(self.replica), 3 * T, "the replica is in sync", self.nodes)
        await asyncio.gather(*(s.start() for s in self.sentinels))

        async def ready(sentinel: RedisNode) -> bool:
            async with sentinel.client() as r:
                replicas: Any = await r.sentinel_slaves(self.service)
                others: Any = await r.sentinel_sentinels(self.service)
            return (
                len(replicas) == 1
                and replicas[0]["port"] == self.replica.port
                and replicas[0]["master-link-status"] == "ok"
                and not replicas[0]["is_sdown"]
                and not replicas[0]["is_disconnected"]
                and len(others) == 2
                and not any(o["is_sdown"] or o["is_disconnected"] for o in others)
            )

        async def all_ready() -> bool:
            return all([await ready(s) for s in self.sentinels])

        what = "every Sentinel sees the replica and the other Sentinels"
        await poll(all_ready, 4 * T, what, self.nodes)

    async def primary_addresses(self) -> list[tuple[str, int] | None]:
        """What each Sentinel answers to ``SENTINEL GET-MASTER-ADDR-BY-NAME`` (None if down)."""
        answers: list[tuple[str, int] | None] = []
        for sentinel in self.sentinels:
            try:
                async with sentinel.client() as r:
                    answer: Any = await r.sentinel_get_master_addr_by_name(self.service)
                    answers.append(answer)
            except NOT_YET:
                answers.append(None)
        return answers

    async def kill_primary(self, timeout: float = 6 * T) -> float:
        """SIGKILL the primary; wait until a majority of Sentinels name the replica as the
        primary and it reports ``role:master``. Returns the seconds that took (from the
        kill); ``primary`` and ``replica`` are then swapped."""
        old, heir = self.primary, self.replica
        started = time.monotonic()
        await old.kill()

        async def promoted() -> bool:
            votes = sum(a == heir.address for a in await self.primary_addresses())
            return votes >= 2 and await heir.role() == "master"

        await poll(promoted, timeout, f"the Sentinels promoted {heir}", self.nodes)
        self.primary, self.replica = heir, old
        return time.monotonic() - started

    async def restart_old_primary(self, timeout: float = 6 * T) -> None:
        """Start the killed primary again (on its port and dir, without data); the Sentinels
        turn it into a replica of the new primary (they wait ~10 s after it reappears before
        doing so). Waits until it is a replica in sync."""
        assert not self.replica.alive, "no primary was killed"
        await self.replica.start()
        what = "the old primary rejoined"
        await poll(lambda: self._link_up(self.replica), timeout, what, self.nodes)
        # In sync by its own account is not yet acknowledged by the primary: a write that
        # waits for a replica (a login's claim) could still time out.
        what = "the new primary counts the old one as an acknowledging replica"
        await poll(self._acknowledged, timeout, what, self.nodes)

    async def return_old_primary_unconverted(self, timeout: float = 2 * T) -> None:
        """Start the killed primary again and return while every Sentinel lists it as a
        healthy replica but it still is an (empty) primary: the ~10 s before they turn it
        into a replica."""
        assert not self.replica.alive, "no primary was killed"
        old = self.replica
        await old.start()

        async def listed_healthy(sentinel: RedisNode) -> bool:
            async with sentinel.client() as r:
                replicas: Any = await r.sentinel_slaves(self.service)
            return any(
                r["port"] == old.port and not (r["is_sdown"] or r["is_disconnected"])
                for r in replicas
            )

        async def window() -> bool:
            listed = all([await listed_healthy(s) for s in self.sentinels])
            return listed and await old.role() == "master"

        await poll(window, timeout, "the Sentinels list the old primary as a replica", self.nodes)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sentinels))
        await asyncio.gather(self.primary.close(), self.replica.close())
