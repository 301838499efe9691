"""The relay's replay of one room subscribed again by itself (on a cluster: its slot moved,
or its node failed): the gap first, then the live events held meanwhile, each once, while
the other rooms go on; retried while the room's node does not answer."""

from __future__ import annotations

import asyncio

import pytest

from broker import BrokerUnavailable, ChatMessage, ChatRun, Resubscribed, RoomEvent
from chatwire.texts import chat_line
from gateway import relay as relay_module
from gateway.relay import Relay
from gateway.rooms import Rooms
from tests.test_room import FakeMember, enter


class FakeBroker:
    """events_after() fails ``failures`` times (the node is failing over), then answers
    from ``stream``, once ``answer`` is set."""

    def __init__(self, stream: dict[str, list[RoomEvent]], failures: int = 0) -> None:
        self.stream = stream
        self.failures = failures
        self.calls = 0
        self.answer = asyncio.Event()

    async def events_after(self, room: str, event_id: str) -> list[RoomEvent]:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise BrokerUnavailable("Error 111 connecting: the node is failing over")
        await self.answer.wait()
        after = tuple(int(p) for p in event_id.split("-"))
        return [e for e in self.stream[room] if tuple(int(p) for p in e.id.split("-")) > after]


def msg(n: int) -> ChatMessage:
    return ChatMessage(f"{n}-0", "ana", f"line {n}")


def run(*numbers: int) -> ChatRun:
    """The run of messages ``numbers``, as the bus carries it."""
    return ChatRun(
        tuple(f"{n}-0" for n in numbers), b"".join(chat_line("ana", f"line {n}") for n in numbers)
    )


def lines(member: FakeMember) -> list[str]:
    return [line for line in member.output.decode().splitlines() if line.startswith("ana:")]


async def test_a_resubscribed_room_gets_its_gap_then_what_came_live_each_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "RETRY_MIN", 0.001)
    rooms = Rooms()
    math, lobby = rooms.open("#math"), rooms.open("#lobby")
    bob, cid = FakeMember("bob"), FakeMember("cid")
    enter(math, bob, "1-0")
    enter(lobby, cid, "1-0")
    math.deliver_batch([msg(2)])
    # Lines 3 and 4 were said while #math's subscription was lost; 5 and 6 come live
    # after it was made again, 5 also being in the stream by the time it is read.
    broker = FakeBroker({"#math": [msg(2), msg(3), msg(4), msg(5)]}, failures=2)
    relay = Relay(broker, "gw-1", rooms, lambda event: None, lambda up: None)  # type: ignore[arg-type]
    relay._deliver([("#math", Resubscribed()), ("#math", msg(5)), ("#lobby", msg(7))])
    relay._deliver([("#math", msg(6))])
    # The lobby goes on meanwhile; #math waits for its replay (its node does not answer).
    assert lines(cid) == ["ana: line 7"]
    assert lines(bob) == ["ana: line 2"]
    broker.answer.set()
    async with asyncio.timeout(1):
        while "#math" in relay._replaying:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
    assert broker.calls == 3  # two failures, then the answer
    assert lines(bob) == [f"ana: line {n}" for n in (2, 3, 4, 5, 6)]
    # Live again: the next line goes straight through.
    relay._deliver([("#math", msg(8))])
    assert lines(bob)[-1] == "ana: line 8"
    assert bob.output.count(chat_line("ana", "line 5")) == 1


async def test_a_run_held_during_a_replay_is_delivered_once_per_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that came live while its room's gap was replayed, its first message also in
    the replayed gap, adds only the messages after the gap; ``received`` counts a run's
    messages, as the bus carried them."""
    monkeypatch.setattr(relay_module, "RETRY_MIN", 0.001)
    rooms = Rooms()
    math = rooms.open("#math")
    bob = FakeMember("bob")
    enter(math, bob, "1-0")
    math.deliver_batch([msg(2)])
    broker = FakeBroker({"#math": [msg(2), msg(3), msg(4)]})
    relay = Relay(broker, "gw-1", rooms, lambda event: None, lambda up: None)  # type: ignore[arg-type]
    relay._deliver([("#math", Resubscribed()), ("#math", run(4, 5, 6))])
    broker.answer.set()
    async with asyncio.timeout(1):
        while "#math" in relay._replaying:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
    assert lines(bob) == [f"ana: line {n}" for n in (2, 3, 4, 5, 6)]
    before = relay.received
    relay._deliver([("#math", run(7, 8, 9))])
    assert relay.received - before == 3
    assert lines(bob)[-3:] == [f"ana: line {n}" for n in (7, 8, 9)]
