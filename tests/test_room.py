"""Fan-out of room events to a gateway's local members, and the registry of hosted rooms."""

from __future__ import annotations

import pytest

from broker import Announcement, ChatMessage, ChatRun, UserJoined, UserLeft
from chatwire.texts import (
    announcement_text,
    chat_line,
    joined_text,
    left_text,
    moved_in_text,
    moved_out_text,
    notice_line,
    summary_text,
)
from gateway import rooms as rooms_module
from gateway.rooms import Room, Rooms
from tests.support import Timers


class FakeMember:
    """Records what the room writes to it, and every abort()."""

    def __init__(self, name: str, closed: bool = False) -> None:
        self.name = name
        self.id = f"{name}-s"
        self.closed = closed
        self.written: list[bytes] = []
        self.aborts = 0

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborts += 1

    @property
    def output(self) -> bytes:
        return b"".join(self.written)


def joined(member: FakeMember, event_id: str, room: str = "") -> UserJoined:
    return UserJoined(event_id, member.name, "gw", member.id, room)


def left(member: FakeMember, event_id: str, to: str = "") -> UserLeft:
    return UserLeft(event_id, member.name, "gw", member.id, to)


def enter(room: Room, member: FakeMember, event_id: str, first: bytes = b"") -> None:
    """Bring ``member`` in as a login does: expect, its join event, then its first bytes."""
    admitted = room.expect(member)
    room.deliver_batch([joined(member, event_id)])
    assert admitted.done() and not admitted.cancelled()
    room.enter(member, first)


def live_room(*names: str, notice_limit: int = 0) -> tuple[Room, list[FakeMember]]:
    """A room whose members (named ``names``) are all in, their outputs cleared."""
    room = Room("#lobby", notice_limit)
    members = [FakeMember(name) for name in names]
    for n, member in enumerate(members):
        enter(room, member, f"1-{n}")
    for member in members:
        member.written.clear()
    return room, members


# -- delivery ------------------------------------------------------------------------------


async def test_a_chat_event_is_written_as_one_bytes_object_to_every_member() -> None:
    """A chat message is encoded once: every member gets the very same bytes object."""
    room, members = live_room("a", "b", "c")
    room.deliver_batch([ChatMessage("2-0", "alice", "hello all")])
    assert [len(m.written) for m in members] == [1, 1, 1]
    assert members[0].written[0] == chat_line("alice", "hello all")
    assert all(m.written[0] is members[0].written[0] for m in members)
    assert room.last_event == "2-0"


async def test_an_announcement_is_a_notice_to_every_member() -> None:
    """An operator's announcement reaches every member as a ``* [admin]`` line."""
    room, members = live_room("a", "b")
    room.deliver_batch([Announcement("2-0", "maintenance at noon")])
    expected = notice_line(announcement_text("maintenance at noon"))
    assert [m.written for m in members] == [[expected], [expected]]


async def test_notify_all_writes_a_notice_to_every_member() -> None:
    """notify_all() sends the gateway's own ``* `` line to every local member."""
    room, members = live_room("a", "b")
    room.notify_all("The message service is back.")
    expected = notice_line("The message service is back.")
    assert [m.written for m in members] == [[expected], [expected]]


async def test_a_batch_is_written_to_each_member_in_one_write() -> None:
    """Events that arrive together reach each member as one write, in order."""
    room, members = live_room("a", "b")
    room.deliver_batch(
        [
            ChatMessage("2-0", "alice", "one"),
            UserJoined("2-1", "carol", "gw-x", "elsewhere"),
            ChatMessage("2-2", "carol", "two"),
        ]
    )
    expected = (
        chat_line("alice", "one") + notice_line(joined_text("carol")) + chat_line("carol", "two")
    )
    assert [m.written for m in members] == [[expected], [expected]]


def run(*messages: tuple[str, str, str]) -> ChatRun:
    """The run of chat messages (id, name, text), as the bus carries it."""
    return ChatRun(
        tuple(i for i, _, _ in messages), b"".join(chat_line(n, t) for _, n, t in messages)
    )


async def test_a_run_is_written_whole_to_every_member_and_counted_per_message() -> None:
    """A run of chat messages reaches each member as its lines, in one write with what
    came with it, and counts one delivery per message and member."""
    room, members = live_room("a", "b")
    before = room._counts.deliveries
    room.deliver_batch(
        [
            run(("2-0", "alice", "one"), ("2-1", "bob", "two"), ("2-2", "alice", "three")),
            Announcement("2-3", "noon"),
        ]
    )
    expected = (
        chat_line("alice", "one")
        + chat_line("bob", "two")
        + chat_line("alice", "three")
        + notice_line(announcement_text("noon"))
    )
    assert [m.written for m in members] == [[expected], [expected]]
    assert room._counts.deliveries - before == 3 * 2
    assert room.last_event == "2-3"


async def test_a_run_partly_delivered_by_a_replay_sends_only_the_rest() -> None:
    """Of a run whose first messages a replay delivered already, only those after them
    are written; a run delivered whole already is skipped."""
    room, (alice,) = live_room("alice")
    room.deliver_batch([ChatMessage("5-0", "x", "one"), ChatMessage("5-1", "x", "two")])
    room.deliver_batch([run(("5-0", "x", "one"), ("5-1", "x", "two"), ("6-0", "y", "three"))])
    room.deliver_batch([run(("5-1", "x", "two"), ("6-0", "y", "three"))])
    assert alice.output == chat_line("x", "one") + chat_line("x", "two") + chat_line("y", "three")
    assert alice.written[-1] == chat_line("y", "three")
    assert room.last_event == "6-0"


async def test_events_not_after_the_last_delivered_are_skipped() -> None:
    """Replayed events (id not greater than the last delivered) are not delivered twice."""
    room, (alice,) = live_room("alice")
    room.deliver_batch([ChatMessage("10-2", "x", "first")])
    room.deliver_batch([ChatMessage("10-2", "x", "first")])  # the same event again
    room.deliver_batch([ChatMessage("10-1", "x", "older"), ChatMessage("9-99", "x", "older")])
    room.deliver_batch([UserJoined("10-0", "Late", "gw", "late-s")])
    room.deliver_batch([ChatMessage("10-10", "x", "newer"), ChatMessage("11-0", "x", "newest")])
    assert alice.written == [
        chat_line("x", "first"),
        chat_line("x", "newer") + chat_line("x", "newest"),
    ]
    assert room.last_event == "11-0"


async def test_a_join_from_another_gateway_only_notifies() -> None:
    """A join event for a session not held here notifies the local members, adds nobody."""
    room, (alice,) = live_room("alice")
    room.deliver_batch([UserJoined("2-0", "Remote", "gw2", "remote-s")])
    assert alice.written == [notice_line(joined_text("Remote"))]
    assert len(room) == 1
    assert "remote-s" not in room


async def test_a_leave_event_of_someone_gone_notifies_the_others() -> None:
    """The leave of a member already forgotten (it hung up) notifies the ones left."""
    room, (alice, bob) = live_room("alice", "bob")
    room.forget(bob)
    room.deliver_batch([left(bob, "2-0")])
    assert alice.written == [notice_line(left_text("bob"))]
    assert bob.written == []


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (UserJoined("2-0", "carol", "gw2", "c-s", "#math"), moved_in_text("carol", "#math")),
        (UserLeft("2-0", "carol", "gw2", "c-s", "#math"), moved_out_text("carol", "#math")),
        (UserJoined("2-0", "carol", "gw2", "c-s"), joined_text("carol")),
        (UserLeft("2-0", "carol", "gw2", "c-s"), left_text("carol")),
    ],
)
async def test_joins_and_leaves_say_where_from_and_where_to(
    event: UserJoined | UserLeft, text: str
) -> None:
    """A move in or out names the other room; a login or logout speaks of the chat."""
    room, (alice,) = live_room("alice")
    room.deliver_batch([event])
    assert alice.written == [notice_line(text)]


# -- entering: expect, own join, enter -----------------------------------------------------


async def test_a_join_event_admits_the_pending_member_and_notifies_the_others() -> None:
    """Its own join admits the newcomer (the future is done); the others see the join."""
    room, (alice,) = live_room("alice")
    bob = FakeMember("bob")
    admitted = room.expect(bob)
    assert not admitted.done()
    assert len(room) == 2
    assert bob.id in room
    assert room.members() == [alice]  # not delivered to before its join
    room.deliver_batch([joined(bob, "2-0")])
    assert admitted.done()
    assert not admitted.cancelled()
    assert bob.written == []
    assert alice.written == [notice_line(joined_text("bob"))]
    assert len(room) == 2
    assert {m.id for m in room.members()} == {alice.id, bob.id}


async def test_traffic_before_the_own_join_does_not_reach_the_newcomer() -> None:
    """A pending newcomer gets nothing of what precedes its join in the stream."""
    room, (alice,) = live_room("alice")
    bob = FakeMember("bob")
    room.expect(bob)
    room.deliver_batch([ChatMessage("2-0", "alice", "before")])
    room.deliver_batch([joined(bob, "3-0")])
    room.enter(bob, b"HISTORY\n")
    assert bob.output == b"HISTORY\n"
    assert alice.output == chat_line("alice", "before") + notice_line(joined_text("bob"))


async def test_traffic_after_the_join_is_held_until_enter_writes_the_history_first() -> None:
    """Between its join and enter() the newcomer's traffic is held; enter() writes the
    first bytes (welcome, history), then the held traffic in order, then it is live."""
    room, _ = live_room("alice")
    bob = FakeMember("bob")
    room.expect(bob)
    room.deliver_batch([joined(bob, "2-0")])
    room.deliver_batch([ChatMessage("3-0", "alice", "live one")])
    room.notify_all("a notice")
    room.deliver_batch([ChatMessage("4-0", "alice", "live two")])
    assert bob.written == []
    room.enter(bob, b"* history\n")
    assert bob.output == (
        b"* history\n"
        + chat_line("alice", "live one")
        + notice_line("a notice")
        + chat_line("alice", "live two")
    )
    bob.written.clear()
    room.deliver_batch([ChatMessage("5-0", "alice", "now")])
    assert bob.written == [chat_line("alice", "now")]


async def test_a_joiner_gets_what_follows_its_join_in_the_same_batch() -> None:
    """In one batch, the joiner misses what came before its join and gets what follows."""
    room, (alice,) = live_room("alice")
    bob = FakeMember("bob")
    admitted = room.expect(bob)
    room.deliver_batch(
        [
            ChatMessage("2-0", "alice", "before"),
            joined(bob, "2-1"),
            ChatMessage("2-2", "alice", "after"),
        ]
    )
    assert admitted.done()
    assert bob.written == []
    room.enter(bob, b"")
    assert bob.output == chat_line("alice", "after")
    assert alice.output == (
        chat_line("alice", "before") + notice_line(joined_text("bob")) + chat_line("alice", "after")
    )


async def test_enter_before_the_join_event_writes_the_history_and_waits_for_the_join() -> None:
    """History at hand before the join arrived is written at once; the newcomer still
    gets nothing before its join, and everything after it, written directly."""
    room, _ = live_room("alice")
    bob = FakeMember("bob")
    admitted = room.expect(bob)
    room.enter(bob, b"* history\n")
    assert bob.written == [b"* history\n"]
    assert not admitted.done()
    room.deliver_batch([ChatMessage("2-0", "alice", "before")])
    room.deliver_batch([joined(bob, "3-0"), ChatMessage("3-1", "alice", "after")])
    assert admitted.done()
    assert bob.written == [b"* history\n", chat_line("alice", "after")]
    room.deliver_batch([ChatMessage("4-0", "alice", "later")])
    assert bob.written[-1] == chat_line("alice", "later")


async def test_enter_with_nothing_first_writes_no_empty_bytes() -> None:
    """enter() with empty first bytes writes only the held traffic."""
    room, _ = live_room("alice")
    bob = FakeMember("bob")
    room.expect(bob)
    room.deliver_batch([joined(bob, "2-0")])
    room.enter(bob, b"")
    assert bob.written == []


async def test_a_replayed_join_does_not_admit_or_notify_twice() -> None:
    """A join event replayed after delivery neither re-admits nor re-notifies."""
    room, (alice,) = live_room("alice")
    bob = FakeMember("bob")
    enter(room, bob, "2-0")
    room.deliver_batch([joined(bob, "2-0")])
    assert alice.written == [notice_line(joined_text("bob"))]
    assert bob.written == []
    assert len(room) == 2


async def test_a_closed_member_is_not_admitted() -> None:
    """A member that hung up before its join event arrived is not added, and gets nothing."""
    room = Room("#lobby")
    bob = FakeMember("bob")
    admitted = room.expect(bob)
    bob.closed = True
    room.deliver_batch([joined(bob, "1-0")])
    assert admitted.done()
    assert len(room) == 0
    room.enter(bob, b"* history\n")
    room.deliver_batch([ChatMessage("2-0", "x", "hello")])
    assert bob.written == []


async def test_enter_of_a_closed_member_writes_nothing() -> None:
    """enter() of a member that hung up after its join writes neither history nor traffic."""
    room, _ = live_room("alice")
    bob = FakeMember("bob")
    room.expect(bob)
    room.deliver_batch([joined(bob, "2-0"), ChatMessage("2-1", "alice", "hi")])
    bob.closed = True
    room.enter(bob, b"* history\n")
    assert bob.written == []


async def test_a_newcomer_whose_history_never_comes_is_aborted_past_the_hold_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Held traffic is bounded: past MAX_HELD_CHUNKS the newcomer is aborted, not buffered."""
    monkeypatch.setattr(rooms_module, "MAX_HELD_CHUNKS", 2)
    room, (alice,) = live_room("alice")
    bob = FakeMember("bob")
    room.expect(bob)
    room.deliver_batch([joined(bob, "2-0")])
    room.deliver_batch([ChatMessage("3-0", "alice", "one")])
    room.deliver_batch([ChatMessage("4-0", "alice", "two")])
    assert bob.aborts == 0
    room.deliver_batch([ChatMessage("5-0", "alice", "three")])
    assert bob.aborts == 1
    assert alice.aborts == 0
    assert len(alice.written) == 4  # the others go on as usual


# -- admit (the join event went missing) ---------------------------------------------------


async def test_admit_after_enter_makes_the_newcomer_live_once() -> None:
    """admit() of an entered newcomer whose join went missing makes it live, only once;
    the late join event then only notifies the others."""
    room, (alice,) = live_room("alice")
    bob = FakeMember("bob")
    admitted = room.expect(bob)
    room.enter(bob, b"* history\n")
    room.admit(bob)
    assert admitted.done() and not admitted.cancelled()
    assert len(room) == 2
    room.admit(bob)
    assert len(room) == 2
    room.deliver_batch([joined(bob, "2-0")])  # the late join event
    assert bob.written == [b"* history\n"]
    assert alice.written == [notice_line(joined_text("bob"))]
    room.deliver_batch([ChatMessage("3-0", "alice", "welcome")])
    assert bob.written == [b"* history\n", chat_line("alice", "welcome")]


async def test_admit_before_enter_holds_traffic_until_enter() -> None:
    """A newcomer admitted before its history came is held like one admitted by its join."""
    room, _ = live_room("alice")
    bob = FakeMember("bob")
    room.expect(bob)
    room.admit(bob)
    room.deliver_batch([ChatMessage("2-0", "alice", "held")])
    assert bob.written == []
    room.enter(bob, b"* history\n")
    assert bob.output == b"* history\n" + chat_line("alice", "held")


async def test_admit_without_expect_does_nothing() -> None:
    """admit() of a member that is not pending does not add it."""
    room = Room("#lobby")
    bob = FakeMember("bob")
    room.admit(bob)
    assert len(room) == 0
    room.deliver_batch([ChatMessage("1-0", "x", "hello")])
    assert bob.written == []


async def test_admit_of_a_closed_member_resolves_but_does_not_add() -> None:
    """admit() of a newcomer that hung up settles its future but does not add it."""
    room = Room("#lobby")
    bob = FakeMember("bob")
    admitted = room.expect(bob)
    bob.closed = True
    room.admit(bob)
    assert admitted.done()
    assert len(room) == 0


# -- forget and clear ----------------------------------------------------------------------


async def test_forget_stops_delivery() -> None:
    """A forgotten member receives nothing more; the others still do."""
    room, (alice, bob) = live_room("alice", "bob")
    room.forget(bob)
    room.deliver_batch([ChatMessage("2-0", "alice", "anyone?")])
    assert bob.written == []
    assert alice.written == [chat_line("alice", "anyone?")]
    assert len(room) == 1
    room.forget(bob)  # forgetting twice is harmless
    assert len(room) == 1


async def test_forget_of_a_pending_member_cancels_its_admission() -> None:
    """forget() during a claim cancels the admission; a later join event does not admit it."""
    room = Room("#lobby")
    bob = FakeMember("bob")
    admitted = room.expect(bob)
    room.forget(bob)
    assert admitted.cancelled()
    room.deliver_batch([joined(bob, "1-0"), ChatMessage("1-1", "x", "hello")])
    assert len(room) == 0
    assert bob.written == []


async def test_forget_of_an_entering_member_drops_what_was_held() -> None:
    """forget() between join and enter: the member is gone, its held traffic with it."""
    room, _ = live_room("alice")
    bob = FakeMember("bob")
    room.expect(bob)
    room.deliver_batch([joined(bob, "2-0"), ChatMessage("2-1", "alice", "held")])
    room.forget(bob)
    assert len(room) == 1
    assert bob.id not in room
    room.deliver_batch([ChatMessage("3-0", "alice", "after")])
    assert bob.written == []


async def test_forget_after_an_early_enter_means_a_later_join_admits_nothing() -> None:
    """A newcomer entered before its join and then forgotten is not made live by the join."""
    room = Room("#lobby")
    bob = FakeMember("bob")
    room.expect(bob)
    room.enter(bob, b"* history\n")
    room.forget(bob)
    room.deliver_batch([joined(bob, "1-0"), ChatMessage("1-1", "x", "after")])
    assert bob.written == [b"* history\n"]
    assert len(room) == 0


async def test_clear_forgets_everyone_and_cancels_pending_admissions() -> None:
    """clear() empties the room, cancels pending admissions, settles pending leaves."""
    room, (alice, carol) = live_room("alice", "carol")
    bob = FakeMember("bob")
    admitted = room.expect(bob)
    leaving = room.expect_leave(carol)
    room.clear()
    assert len(room) == 0
    assert room.idle()
    assert admitted.cancelled()
    assert leaving.done() and not leaving.cancelled()
    room.deliver_batch([ChatMessage("2-0", "x", "anyone?")])
    assert alice.written == []


# -- leaving for another room --------------------------------------------------------------


async def test_a_mover_gets_the_room_until_its_own_leave_event() -> None:
    """A member moving on receives what precedes its leave, nothing after; the others see it
    leave for the new room; the future is done and the member gone."""
    room, (alice, bob) = live_room("alice", "bob")
    leaving = room.expect_leave(bob)
    room.deliver_batch([ChatMessage("2-0", "alice", "still here")])
    assert bob.written == [chat_line("alice", "still here")]
    assert not leaving.done()
    assert not room.idle()
    room.deliver_batch(
        [
            ChatMessage("3-0", "alice", "before"),
            left(bob, "3-1", to="#math"),
            ChatMessage("3-2", "alice", "after"),
        ]
    )
    assert leaving.done() and not leaving.cancelled()
    assert bob.output == chat_line("alice", "still here") + chat_line("alice", "before")
    assert alice.output == (
        chat_line("alice", "still here")
        + chat_line("alice", "before")
        + notice_line(moved_out_text("bob", "#math"))
        + chat_line("alice", "after")
    )
    assert bob.id not in room
    assert len(room) == 1


async def test_forget_of_a_mover_settles_its_leave() -> None:
    """forget() of a member waiting for its leave event ends the wait (it hung up)."""
    room, (_, bob) = live_room("alice", "bob")
    leaving = room.expect_leave(bob)
    room.forget(bob)
    assert leaving.done() and not leaving.cancelled()
    assert room.idle() is False  # alice is still here
    assert bob.id not in room


async def test_a_leave_announced_while_still_connected_keeps_the_member() -> None:
    """A leave for a member held here that is not moving on (this gateway was taken for
    dead) notifies the others but keeps delivering to it."""
    room, (alice, bob) = live_room("alice", "bob")
    room.deliver_batch([left(bob, "2-0")])
    assert alice.written == [notice_line(left_text("bob"))]
    assert bob.written == []
    room.deliver_batch([ChatMessage("3-0", "alice", "still there?")])
    assert bob.written == [chat_line("alice", "still there?")]
    assert len(room) == 2


async def test_the_leave_of_the_last_mover_leaves_the_room_idle() -> None:
    """A room is idle only when nobody is in it, on the way in, or on the way out."""
    room = Room("#math")
    assert room.idle()
    bob = FakeMember("bob")
    room.expect(bob)
    assert not room.idle()
    room.deliver_batch([joined(bob, "1-0")])
    assert not room.idle()
    room.enter(bob, b"")
    room.expect_leave(bob)
    assert not room.idle()
    room.deliver_batch([left(bob, "2-0", to="#lobby")])
    assert room.idle()


# -- summaries in a busy room --------------------------------------------------------------


async def test_joins_and_leaves_in_a_busy_room_are_summarised_by_phrase(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the notice limit, others' joins and leaves come as one summary line per phrase
    per period instead of one line each: a storm costs each member a line, not one per join."""
    timers = Timers(monkeypatch)
    room, members = live_room("a", "b", notice_limit=1)
    joins = [UserJoined(f"2-{n}", f"user{n}", "gw-x", f"x{n}") for n in range(7)]
    room.deliver_batch(
        [
            *joins,
            UserLeft("3-0", "user0", "gw-x", "x0"),
            UserJoined("3-1", "mover", "gw-x", "m", "#math"),
            UserLeft("3-2", "user1", "gw-x", "x1", "#math"),
            ChatMessage("3-3", "user2", "chat is not summarised"),
        ]
    )
    assert members[0].written == [chat_line("user2", "chat is not summarised")]
    assert [delay for delay, _, _ in timers.scheduled] == [rooms_module.SUMMARY_PERIOD]
    for member in members:
        member.written.clear()
    timers.fire()
    assert members[0].output == (
        notice_line("7 users joined the chat: user0, user1, user2, user3, user4 and 2 more")
        + notice_line(left_text("user0"))
        + notice_line(moved_in_text("mover", "#math"))
        + notice_line(moved_out_text("user1", "#math"))
    )
    assert members[1].output == members[0].output


async def test_a_summary_period_starts_afresh_after_each_summary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a summary is sent the next join starts a new period and a new summary."""
    timers = Timers(monkeypatch)
    room, (a, _) = live_room("a", "b", notice_limit=1)
    room.deliver_batch([UserJoined("2-0", "u1", "gw-x", "x1"), UserJoined("2-1", "u2", "gw", "x2")])
    timers.fire()
    assert a.written == [notice_line(summary_text(["u1", "u2"], "joined the chat"))]
    room.deliver_batch([UserJoined("3-0", "u3", "gw-x", "x3")])
    assert len(timers.pending()) == 1
    timers.fire()
    assert a.written[-1] == notice_line(joined_text("u3"))
    timers.fire()  # nothing left to say
    assert len(a.written) == 2


async def test_own_joiners_are_summarised_in_a_busy_room_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A storm of joins on this very gateway stays linear: past the notice limit the
    joiners are admitted one by one but announced in the summary, not each to everyone."""
    timers = Timers(monkeypatch)
    room, members = live_room("a", "b", notice_limit=1)
    newcomers = [FakeMember(f"n{i}") for i in range(3)]
    for n, member in enumerate(newcomers):
        enter(room, member, f"2-{n}")
    assert len(room) == 5
    assert members[0].written == []  # no per-join line to everyone
    timers.fire()
    assert members[0].written == [notice_line("3 users joined the chat: n0, n1, n2")]


async def test_a_quiet_room_announces_each_join_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """At or under the notice limit, each join is its own line, with no summary timer."""
    timers = Timers(monkeypatch)
    room, (a, _) = live_room("a", "b", notice_limit=2)
    room.deliver_batch([UserJoined("2-0", "u1", "gw-x", "x1")])
    assert a.written == [notice_line(joined_text("u1"))]
    assert timers.scheduled == []


async def test_own_movers_leaving_a_busy_room_are_summarised_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A storm of moves out of a busy room stays linear: the movers' leaves are summarised
    like every other join and leave there, not each written to everyone at once."""
    timers = Timers(monkeypatch)
    room, (a, _, c) = live_room("a", "b", "c", notice_limit=1)
    timers.fire()  # c's own join was summarised already
    a.written.clear()
    c.written.clear()
    room.expect_leave(c)
    room.deliver_batch([left(c, "2-0", to="#math")])
    assert a.written == []
    timers.fire()
    assert a.written == [notice_line(moved_out_text("c", "#math"))]
    assert c.written == []  # gone before the summary


async def test_clear_cancels_a_pending_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """clear() drops the summary timer: nothing is written after shutdown."""
    timers = Timers(monkeypatch)
    room, _ = live_room("a", "b", notice_limit=1)
    room.deliver_batch([UserJoined("2-0", "u1", "gw-x", "x1")])
    assert len(timers.pending()) == 1
    room.clear()
    assert timers.pending() == []


# -- the registry of hosted rooms ----------------------------------------------------------


async def test_open_makes_a_room_once_with_the_registry_notice_limit() -> None:
    """open() makes the room on first use, with its key and the notice limit; then reuses it."""
    rooms = Rooms(notice_limit=7)
    assert rooms.get("#math") is None
    room = rooms.open("#math")
    assert room.key == "#math"
    assert room.notice_limit == 7
    assert rooms.open("#math") is room
    assert rooms.get("#math") is room
    assert len(rooms) == 1
    assert list(rooms) == [room]


async def test_close_if_empty_keeps_a_room_someone_is_in_or_entering() -> None:
    """A room with a member, a newcomer or a mover on its way out is not closed."""
    rooms = Rooms()
    room = rooms.open("#math")
    bob = FakeMember("bob")
    room.expect(bob)
    assert rooms.close_if_empty("#math") is False  # pending
    room.deliver_batch([joined(bob, "1-0")])
    assert rooms.close_if_empty("#math") is False  # entering
    room.enter(bob, b"")
    assert rooms.close_if_empty("#math") is False  # in
    room.expect_leave(bob)
    assert rooms.close_if_empty("#math") is False  # on its way out
    assert rooms.get("#math") is room


async def test_close_if_empty_closes_an_idle_room() -> None:
    """Once its last member is gone the room closes: get() finds it no more, open() is new."""
    rooms = Rooms()
    room = rooms.open("#math")
    bob = FakeMember("bob")
    enter(room, bob, "1-0")
    room.forget(bob)
    assert rooms.close_if_empty("#math") is True
    assert rooms.get("#math") is None
    assert len(rooms) == 0
    assert rooms.close_if_empty("#math") is False  # not hosted
    assert rooms.open("#math") is not room


async def test_a_room_awaiting_a_leave_event_is_not_closed() -> None:
    """A room still waiting for a mover's own leave event is not idle, nor closed."""
    rooms = Rooms()
    room = rooms.open("#math")
    leaving = room.expect_leave(FakeMember("bob"))
    assert len(room) == 0
    assert not room.idle()
    assert rooms.close_if_empty("#math") is False
    room.deliver_batch([UserLeft("1-0", "bob", "gw", "bob-s", "#lobby")])
    assert leaving.done()
    assert rooms.close_if_empty("#math") is True


async def test_closing_a_room_drops_its_pending_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """A room closed with a summary still due cancels it: no timer outlives the room."""
    timers = Timers(monkeypatch)
    rooms = Rooms(notice_limit=1)
    room = rooms.open("#math")
    members = [FakeMember("a"), FakeMember("b")]
    for n, member in enumerate(members):
        enter(room, member, f"1-{n}")
    room.deliver_batch([UserJoined("2-0", "u1", "gw-x", "x1")])
    assert len(timers.pending()) == 1
    for member in members:
        room.forget(member)
    assert rooms.close_if_empty("#math") is True
    assert timers.pending() == []


async def test_members_counts_everyone_across_rooms() -> None:
    """members() counts the local members of every hosted room, newcomers included."""
    rooms = Rooms()
    enter(rooms.open("#lobby"), FakeMember("a"), "1-0")
    enter(rooms.open("#lobby"), FakeMember("b"), "1-1")
    rooms.open("#math").expect(FakeMember("c"))
    assert rooms.members() == 3


async def test_clear_empties_every_room() -> None:
    """Rooms.clear() forgets every member of every room and hosts nothing more."""
    rooms = Rooms()
    a = FakeMember("a")
    lobby = rooms.open("#lobby")
    enter(lobby, a, "1-0")
    admitted = rooms.open("#math").expect(FakeMember("c"))
    rooms.clear()
    assert len(rooms) == 0
    assert admitted.cancelled()
    lobby.deliver_batch([ChatMessage("2-0", "x", "anyone?")])
    assert a.written == []
