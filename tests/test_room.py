"""Fan-out of room events to a gateway's local members."""

from __future__ import annotations

import asyncio

import pytest
from gateway.room import Room

from broker import ChatMessage, UserJoined, UserLeft
from gateway.protocol import chat_line, joined_text, left_text, notice_line


class FakeMember:
    """Records what the room writes to it and every accept()."""

    def __init__(self, member_id: str, closed: bool = False) -> None:
        self.id = member_id
        self.closed = closed
        self.written: list[bytes] = []
        self.accepted: list[int] = []

    def accept(self, online: int) -> None:
        self.accepted.append(online)

    def write(self, data: bytes) -> None:
        self.written.append(data)


async def join(room: Room, member: FakeMember, event_id: str, online: int = 1) -> None:
    """Admit ``member`` through its join event, as a login does."""
    admitted = room.expect(member)
    room.deliver(UserJoined(event_id, member.id.upper(), "gw", member.id, online))
    async with asyncio.timeout(1):
        await admitted


async def test_a_chat_event_is_written_as_one_bytes_object_to_every_member() -> None:
    """A chat message is encoded once: every member gets the very same bytes object."""
    room = Room()
    members = [FakeMember(f"s{i}") for i in range(3)]
    for n, member in enumerate(members):
        await join(room, member, f"1-{n}", n + 1)
    for member in members:
        member.written.clear()
    room.deliver(ChatMessage("2-0", "alice", "hello all"))
    assert [len(m.written) for m in members] == [1, 1, 1]
    assert members[0].written[0] == chat_line("alice", "hello all")
    assert all(m.written[0] is members[0].written[0] for m in members)
    assert room.last_event == "2-0"


async def test_a_join_event_admits_the_pending_member_and_notifies_the_others() -> None:
    """The joiner is accepted with the room size and skipped; others see the join notice."""
    room = Room()
    alice, bob = FakeMember("alice-s"), FakeMember("bob-s")
    await join(room, alice, "1-0", 1)
    assert alice.accepted == [1]
    assert alice.written == []

    admitted = room.expect(bob)
    assert not admitted.done()
    assert len(room) == 1
    room.deliver(UserJoined("2-0", "Bob", "gw", "bob-s", 2))
    assert admitted.done()
    assert not admitted.cancelled()
    assert bob.accepted == [2]
    assert bob.written == []
    assert alice.written == [notice_line(joined_text("Bob"))]
    assert len(room) == 2
    assert {m.id for m in room.members()} == {"alice-s", "bob-s"}


async def test_a_join_from_another_gateway_only_notifies() -> None:
    """A join event for a session that is not pending here only notifies local members."""
    room = Room()
    alice = FakeMember("alice-s")
    await join(room, alice, "1-0")
    room.deliver(UserJoined("2-0", "Remote", "gw2", "remote-s", 2))
    assert alice.written == [notice_line(joined_text("Remote"))]
    assert alice.accepted == [1]
    assert len(room) == 1


async def test_a_leave_event_notifies_the_others() -> None:
    """A leave event writes the leave notice to every other member."""
    room = Room()
    alice, bob = FakeMember("alice-s"), FakeMember("bob-s")
    await join(room, alice, "1-0")
    await join(room, bob, "1-1", 2)
    alice.written.clear()
    room.forget(bob)
    room.deliver(UserLeft("2-0", "Bob", "gw", "bob-s"))
    assert alice.written == [notice_line(left_text("Bob"))]
    assert bob.written == []


async def test_events_not_after_the_last_delivered_are_skipped() -> None:
    """Replayed events (id not greater than the last delivered) are not delivered twice."""
    room = Room()
    alice = FakeMember("alice-s")
    await join(room, alice, "5-0")
    room.deliver(ChatMessage("10-2", "x", "first"))
    room.deliver(ChatMessage("10-2", "x", "first"))  # the same event again
    room.deliver(ChatMessage("10-1", "x", "older"))
    room.deliver(ChatMessage("9-99", "x", "older still"))
    room.deliver(UserJoined("10-0", "Late", "gw", "late-s", 2))
    room.deliver(ChatMessage("10-10", "x", "newer"))
    room.deliver(ChatMessage("11-0", "x", "newest"))
    assert alice.written == [
        chat_line("x", "first"),
        chat_line("x", "newer"),
        chat_line("x", "newest"),
    ]
    assert room.last_event == "11-0"


async def test_a_replayed_join_does_not_admit_twice() -> None:
    """A join event replayed after delivery neither re-admits nor re-notifies."""
    room = Room()
    alice, bob = FakeMember("alice-s"), FakeMember("bob-s")
    await join(room, alice, "1-0")
    await join(room, bob, "2-0", 2)
    room.deliver(UserJoined("2-0", "BOB-S", "gw", "bob-s", 2))
    assert bob.accepted == [2]
    assert alice.written == [notice_line(joined_text("BOB-S"))]


async def test_forget_stops_delivery() -> None:
    """A forgotten member receives nothing more; the others still do."""
    room = Room()
    alice, bob = FakeMember("alice-s"), FakeMember("bob-s")
    await join(room, alice, "1-0")
    await join(room, bob, "1-1", 2)
    alice.written.clear()
    room.forget(bob)
    room.deliver(ChatMessage("2-0", "alice", "anyone?"))
    assert bob.written == []
    assert alice.written == [chat_line("alice", "anyone?")]
    assert len(room) == 1
    room.forget(bob)  # forgetting twice is harmless
    assert len(room) == 1


async def test_forget_of_a_pending_member_cancels_its_admission() -> None:
    """forget() during a claim cancels the admission; a later join event does not admit it."""
    room = Room()
    bob = FakeMember("bob-s")
    admitted = room.expect(bob)
    room.forget(bob)
    assert admitted.cancelled()
    room.deliver(UserJoined("1-0", "Bob", "gw", "bob-s", 1))
    assert bob.accepted == []
    assert len(room) == 0


async def test_admit_fallback_admits_once() -> None:
    """admit() admits a pending member whose join event went missing, and only once."""
    room = Room()
    alice, bob = FakeMember("alice-s"), FakeMember("bob-s")
    await join(room, alice, "1-0")
    room.expect(bob)
    room.admit(bob, 2)
    assert bob.accepted == [2]
    assert len(room) == 2
    room.admit(bob, 2)
    room.deliver(UserJoined("2-0", "Bob", "gw", "bob-s", 2))  # the late join event
    assert bob.accepted == [2]
    assert bob.written == []
    assert alice.written == [notice_line(joined_text("Bob"))]
    room.deliver(ChatMessage("3-0", "alice", "welcome"))
    assert bob.written == [chat_line("alice", "welcome")]


async def test_admit_without_expect_does_nothing() -> None:
    """admit() of a member that is not pending neither accepts nor adds it."""
    room = Room()
    bob = FakeMember("bob-s")
    room.admit(bob, 1)
    assert bob.accepted == []
    assert len(room) == 0


async def test_a_closed_member_is_not_admitted() -> None:
    """A member that hung up before its join event arrived is not accepted or added."""
    room = Room()
    bob = FakeMember("bob-s")
    admitted = room.expect(bob)
    bob.closed = True
    room.deliver(UserJoined("1-0", "Bob", "gw", "bob-s", 1))
    assert admitted.done()
    assert bob.accepted == []
    assert len(room) == 0


async def test_clear_forgets_members_and_cancels_pending_logins() -> None:
    """clear() empties the room and cancels every pending admission."""
    room = Room()
    alice, bob = FakeMember("alice-s"), FakeMember("bob-s")
    await join(room, alice, "1-0")
    admitted = room.expect(bob)
    room.clear()
    assert len(room) == 0
    assert admitted.cancelled()
    room.deliver(ChatMessage("2-0", "x", "anyone?"))
    assert alice.written == []


async def test_a_batch_is_written_to_each_member_in_one_write() -> None:
    """Events that arrive together reach each member as one write, in order."""
    room = Room()
    members = [FakeMember(f"s{i}") for i in range(2)]
    for n, member in enumerate(members):
        await join(room, member, f"1-{n}", n + 1)
    for member in members:
        member.written.clear()
    room.deliver_batch(
        [
            ChatMessage("2-0", "alice", "one"),
            UserJoined("2-1", "carol", "gw-x", "elsewhere", 3),
            ChatMessage("2-2", "carol", "two"),
        ]
    )
    expected = (
        chat_line("alice", "one") + notice_line(joined_text("carol")) + chat_line("carol", "two")
    )
    assert [m.written for m in members] == [[expected], [expected]]


async def test_a_joiner_gets_what_follows_its_join_in_the_same_batch() -> None:
    """In one batch, the joiner misses what came before its join and gets what follows."""
    room = Room()
    alice = FakeMember("alice-s")
    await join(room, alice, "1-0")
    bob = FakeMember("bob-s")
    admitted = room.expect(bob)
    room.deliver_batch(
        [
            ChatMessage("2-0", "alice", "before"),
            UserJoined("2-1", "BOB", "gw", "bob-s", 2),
            ChatMessage("2-2", "alice", "after"),
        ]
    )
    assert admitted.done()
    assert b"".join(bob.written) == chat_line("alice", "after")
    assert b"".join(alice.written) == (
        chat_line("alice", "before") + notice_line(joined_text("BOB")) + chat_line("alice", "after")
    )


async def test_joins_in_a_busy_room_are_summarised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the notice limit, others' joins and leaves come as one summary line per period
    instead of one line each: a join storm costs each member a line, not a line per join."""
    monkeypatch.setattr("gateway.room.SUMMARY_PERIOD", 0.01)
    room = Room(notice_limit=1)
    members = [FakeMember(f"s{i}") for i in range(2)]
    for n, member in enumerate(members):
        await join(room, member, f"1-{n}", n + 1)
    for member in members:
        member.written.clear()
    joins = [UserJoined(f"2-{n}", f"user{n}", "gw-x", f"x{n}", 3 + n) for n in range(7)]
    room.deliver_batch([*joins, UserLeft("3-0", "user0", "gw-x", "x0")])
    assert members[0].written == []
    summary = asyncio.Event()
    members[0].write = lambda data: (members[0].written.append(data), summary.set())  # type: ignore[method-assign]
    async with asyncio.timeout(1):
        await summary.wait()
    assert b"".join(members[0].written) == notice_line(
        "7 users joined the chat: user0, user1, user2, user3, user4 and 2 more"
    ) + notice_line("user0 left the chat")


async def test_own_joiners_are_summarised_in_a_busy_room_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A storm of joins on this very gateway stays linear: past the notice limit the
    joiners are admitted one by one but announced in the summary, not each to everyone."""
    monkeypatch.setattr("gateway.room.SUMMARY_PERIOD", 0.01)
    room = Room(notice_limit=1)
    members = [FakeMember(f"s{i}") for i in range(2)]
    for n, member in enumerate(members):
        await join(room, member, f"1-{n}", n + 1)
    for member in members:
        member.written.clear()
    newcomers = [FakeMember(f"n{i}") for i in range(3)]
    for n, member in enumerate(newcomers):
        await join(room, member, f"2-{n}", 3 + n)
    assert [m.accepted for m in newcomers] == [[3], [4], [5]]
    assert members[0].written == []  # no per-join line to everyone
    summary = asyncio.Event()
    members[0].write = lambda data: (members[0].written.append(data), summary.set())  # type: ignore[method-assign]
    async with asyncio.timeout(1):
        await summary.wait()
    assert members[0].written == [notice_line("3 users joined the chat: N0, N1, N2")]
