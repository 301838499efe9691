"""Which broker calls are sent again after the link broke before the reply came.

A Redis that runs a script and dies before answering leaves the caller not knowing
whether it ran. Calls that give the same result when repeated (claim by the same
session, a room's enter and leave, release, heartbeat...) are retried; calls that add to
what users see each time they run (a message or notice published in a room, a private
message or kick sent to a gateway's inbox) are not, or it would be shown twice. A
stand-in server that reads each script call and hangs up without answering tells how
many times each was sent.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from broker import BrokerUnavailable, Member, RedisBroker
from broker import scripts as broker_scripts
from broker.events import encode_join, encode_leave, encode_message
from chatwire.names import DEFAULT_ROOM, DEFAULT_ROOM_KEY


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


Call = Callable[[RedisBroker], Awaitable[object]]
ROOM = DEFAULT_ROOM_KEY
LEAVE = encode_leave("Alice", "gw1", "s1")

#: Each script that must go out once, with a broker call that runs it.
ONCE: dict[str, list[Call]] = {
    "publish": [
        lambda b: b.publish(ROOM, [encode_message("alice", "hi")]),
        lambda b: b.announce("maintenance at noon", ROOM),
    ],
    "send_to_holder": [
        lambda b: b.send_private("bob", "Alice", "psst"),
        lambda b: b.kick("bob", "spam"),
    ],
}

#: Each script that may be sent again, with a broker call that runs it.
RETRIED: dict[str, Call] = {
    "claim": lambda b: b.claim("alice", "Alice", "gw1", "inst", "s1", 1.0),
    "set_room": lambda b: b.set_room("alice", "s1", "#math"),
    "release": lambda b: b.release("alice", "s1", "gw1"),
    "register": lambda b: b.register_gateway("gw1", "inst", "gw1:1", 1.0, 5.0),
    "heartbeat": lambda b: b.heartbeat("gw1", "inst", 5.0),
    "reap": lambda b: b.reap_dead_gateways(),
    "held_by": lambda b: b.evict("gw1"),
    "deregister": lambda b: b._global("deregister", ("gw1", "inst")),
    "forget": lambda b: b._global("forget", ("gw1", "alice", "s1")),
    "touch": lambda b: b.touch({"alice": 1.0}),
    "restore": lambda b: b.restore_gateway("gw1", "inst", "gw1:1", 1.0, 5.0, []),
    "enter": lambda b: b.enter(
        ROOM, DEFAULT_ROOM, [Member("s1", "Alice", "gw1", encode_join("Alice", "gw1", "s1"))]
    ),
    "leave": lambda b: b.leave(ROOM, [("s1", LEAVE)]),
    "force_leave": lambda b: b.force_leave(ROOM, "s1", LEAVE),
}


def test_every_script_is_classified() -> None:
    """Each script of the broker is tested here as sent once or as retried."""
    every = set(broker_scripts.GLOBAL_SCRIPTS) | set(broker_scripts.ROOM_SCRIPTS)
    assert set(ONCE) | set(RETRIED) == every
    assert not set(ONCE) & set(RETRIED)


@pytest.mark.parametrize(
    ("script", "call"),
    [(script, call) for script, calls in ONCE.items() for call in calls],
    ids=["publish", "announce", "send_private", "kick"],
)
async def test_what_users_would_see_twice_is_sent_once(
    broker_on_a_dying_redis: tuple[RedisBroker, HangUpOnScripts], script: str, call: Call
) -> None:
    """A message, notice, private message or kick whose reply was lost is reported as
    failed, not sent again."""
    broker, server = broker_on_a_dying_redis
    with pytest.raises(BrokerUnavailable):
        await call(broker)
    assert sent(broker, server, script) == 1
    assert sum(server.scripts.values()) == 1


@pytest.mark.parametrize(("script", "call"), list(RETRIED.items()), ids=list(RETRIED))
async def test_a_repeatable_script_is_retried(
    broker_on_a_dying_redis: tuple[RedisBroker, HangUpOnScripts], script: str, call: Call
) -> None:
    """The contrast: repeating a claim, a release, a room's enter or leave, or a liveness
    step is harmless, so a broken link is retried."""
    broker, server = broker_on_a_dying_redis
    with pytest.raises(BrokerUnavailable):
        await call(broker)
    assert sent(broker, server, script) > 1
