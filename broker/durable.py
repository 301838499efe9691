"""Writes that count once a replica has them: a script followed by ``WAIT 1`` on the same
connection, on Sentinel's primary or on the cluster node owning the script's slot.

Redis replicates asynchronously: a primary that dies takes with it whatever its replicas
had not received yet. A message, a join or a name claim that the service acted upon must
not vanish that way when a replica is promoted, so each such script is followed by
``WAIT 1`` (which must run on the script's own connection: it waits for that connection's
writes). A write that no replica acknowledged in time is refused (:class:`BrokerUnavailable`:
the caller answers or retries as for any outage), unless the primary has no replica
connected at all: then nothing could be promoted in its place, and there is nothing to wait
for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import nullcontext, suppress
from typing import Any

import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript

from broker.errors import BrokerUnavailable

#: Milliseconds a write waits for a replica's acknowledgement.
REPLICA_WAIT_MS = 500
#: Redirections (MOVED, ASK, TRYAGAIN, NOSCRIPT) followed for one script call, at most.
MAX_REDIRECTS = 8
#: Seconds between two tries of a script whose slot is being migrated (TRYAGAIN).
TRYAGAIN_PAUSE = 0.05


async def run_on_primary(client: Any, script: AsyncScript, keys: Sequence[str],
                         args: Sequence[Any]) -> Any:  # fmt: skip
    """``script`` then ``WAIT 1`` on one connection of ``client`` (one primary: Sentinel)."""
    async with client.pipeline(transaction=False) as pipe:
        await script(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS)
        result, acknowledged = await pipe.execute()
    if not int(acknowledged) and await _has_replicas(client):
        raise BrokerUnavailable("no replica acknowledged the write in time")
    return result


async def run_on_cluster(cluster: RedisCluster, script: AsyncScript, keys: Sequence[str],
                         args: Sequence[Any]) -> Any:  # fmt: skip
    """``script`` then ``WAIT 1`` on one connection to the node owning the slot of
    ``keys``, following the cluster's redirections (none of which ran the script). A node
    without replicas runs the script alone."""
    slot = cluster.keyslot(keys[0])
    turns = getattr(cluster, "turns", None) or nullcontext()
    asking: ClusterNode | None = None
    for _ in range(MAX_REDIRECTS):
        owners = cluster.nodes_manager.slots_cache.get(slot) or []
        if asking is None and len(owners) < 2:
            return await script(keys=keys, args=args)  # no replica (or no map yet)
        node = asking or owners[0]
        commands: list[tuple[Any, ...]] = [("ASKING",)] if asking is not None else []
        commands += [("EVALSHA", script.sha, len(keys), *keys, *args),
                     ("WAIT", 1, REPLICA_WAIT_MS)]  # fmt: skip
        try:
            async with turns:
                *_, result, acknowledged = await _send(node, commands)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            # The node may be gone for good (failed over): read the map again for the
            # next call, and let this one fail (the script may have run).
            with suppress(redis.exceptions.RedisError, OSError):
                await cluster.nodes_manager.initialize()
            raise
        asking = None
        match result:
            case redis.exceptions.NoScriptError():
                await node.execute_command("SCRIPT", "LOAD", script.script)
            case redis.exceptions.MovedError():
                await cluster.nodes_manager.initialize()
            case redis.exceptions.AskError():
                asking = cluster.get_node(host=result.host, port=result.port)
                if asking is None:
                    await cluster.nodes_manager.initialize()
            case redis.exceptions.TryAgainError():
                await asyncio.sleep(TRYAGAIN_PAUSE)
            case Exception():
                raise result
            case _:
                if not int(acknowledged) and await _has_replicas(node):
                    raise BrokerUnavailable("no replica acknowledged the write in time")
                return result
    raise BrokerUnavailable(f"slot {slot} kept moving: gave up after {MAX_REDIRECTS} tries")


async def _send(node: ClusterNode, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` on one connection to ``node``; their replies, an error reply as
    its exception. A broken link disconnects it and raises."""
    connection = node.acquire_connection()
    try:
        await connection.send_packed_command(connection.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except redis.exceptions.ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        node.release(connection)


async def _has_replicas(client: Any) -> bool:
    """Whether a replica is connected to the primary ``client`` talks to."""
    info = await client.execute_command("INFO", "replication")
    if isinstance(info, bytes | str):
        text = info.decode() if isinstance(info, bytes) else info
        return any(
            line.startswith("connected_slaves:") and line.split(":", 1)[1].strip() != "0"
            for line in text.splitlines()
        )
    return int(info.get("connected_slaves", 0)) > 0
