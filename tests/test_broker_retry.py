"""Which broker calls are sent again after the link broke before the reply came.

A Redis that runs a script and dies before answering leaves the caller not knowing
whether it ran. Calls that give the same result when repeated (claim by the same
session, release, heartbeat...) are retried; calls that append to the room (a message, a
kick) are not, or the room would show them twice. A stand-in server that reads
each script call and hangs up without answering tells how many times each was sent.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from broker import BrokerUnavailable, RedisBroker


class HangUpOnScripts:
    """Speaks just enough RESP: PONG to PING, OK to anything else, but closes on a script
    call without answering."""

    def __init__(self) -> None:
        self.scripts: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while command := await self._read_command(reader):
                if command[0].upper() in (b"EVALSHA", b"EVAL"):
                    self.scripts[command[1].decode()] += 1
                    break  # ran, perhaps: the caller cannot know
                writer.write(b"+PONG\r\n" if command[0].upper() == b"PING" else b"+OK\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _read_command(reader: asyncio.StreamReader) -> list[bytes]:
        header = await reader.readline()
        if not header:
            return []
        assert header.startswith(b"*"), header
        args = []
        for _ in range(int(header[1:])):
            size = int((await reader.readline())[1:])
            args.append((await reader.readexactly(size + 2))[:-2])
        return args


@pytest.fixture
async def broker_on_a_dying_redis() -> AsyncIterator[tuple[RedisBroker, HangUpOnScripts]]:
    server = HangUpOnScripts()
    await server.start()
    broker = RedisBroker.from_url(f"redis://127.0.0.1:{server.port}/0")
    try:
        yield broker, server
    finally:
        await broker.close()
        await server.close()


def sent(broker: RedisBroker, server: HangUpOnScripts, script: str) -> int:
    return server.scripts[broker._scripts[script].sha]


async def test_a_message_is_sent_once(
    broker_on_a_dying_redis: tuple[RedisBroker, HangUpOnScripts],
) -> None:
    broker, server = broker_on_a_dying_redis
    with pytest.raises(BrokerUnavailable):
        await broker.publish(['{"kind": "message", "name": "alice", "text": "hi"}'])
    assert sent(broker, server, "publish") == 1


async def test_a_release_is_retried(
    broker_on_a_dying_redis: tuple[RedisBroker, HangUpOnScripts],
) -> None:
    """The contrast: repeating a release is harmless, so a broken link is retried."""
    broker, server = broker_on_a_dying_redis
    with pytest.raises(BrokerUnavailable):
        await broker.release("alice", "s1", "gw1")
    assert sent(broker, server, "release") > 1
