"""The broker layer on an embedded fakeredis server: presence, rooms, private delivery,
liveness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from broker import (
    Announcement,
    BrokerUnavailable,
    ChatMessage,
    ChatRun,
    Delivery,
    GatewayIdInUse,
    Held,
    Member,
    PrivateDelivery,
    RedisBroker,
    Subscription,
    UserJoined,
    UserKicked,
    UserLeft,
    connect,
    keys,
    redact_url,
    stream_id_key,
)
from broker.events import encode_join, encode_leave, encode_message
from broker.translate import text
from chatwire.names import DEFAULT_ROOM, DEFAULT_ROOM_KEY, name_key, room_key

TTL = 30.0
MARKER = "--marker--"
LOBBY = DEFAULT_ROOM_KEY
MATH = room_key("#Math")


@pytest.fixture
async def broker() -> AsyncIterator[RedisBroker]:
    b = RedisBroker.embedded()
    try:
        yield b
    finally:
        await b.close()


async def register(broker: RedisBroker, gid: str, instance: str = "inst", ttl: float = TTL) -> int:
    return await broker.register_gateway(gid, instance, f"{gid}.example:7000", time.time(), ttl)


async def login(
    broker: RedisBroker, name: str, gid: str, session: str, instance: str = "inst"
) -> str:
    """Claim ``name`` and enter the default room as a gateway does; return the join's id."""
    result = await broker.claim(name_key(name), name, gid, instance, session, time.time())
    assert result.accepted, f"claim of {name} refused"
    entered = await broker.enter(
        LOBBY, DEFAULT_ROOM, [Member(session, name, gid, encode_join(name, gid, session))]
    )
    return entered.join_ids[0]


async def move(
    broker: RedisBroker, name: str, gid: str, session: str, to: str, shown: str, leave: bool = True
) -> None:
    """Move ``name`` from the room presence says it is in to ``to`` as a gateway does:
    presence first, then the join, then (unless cut short) the leave of the old room."""
    old = next(p.room_key for p in await broker.online() if p.session == session)
    assert await broker.set_room(name_key(name), session, to)
    await broker.enter(to, shown, [Member(session, name, gid, encode_join(name, gid, session, to))])
    if leave:
        await broker.leave(old, [(session, encode_leave(name, gid, session, shown))])


async def expire(broker: RedisBroker, gid: str) -> None:
    """Make ``gid``'s liveness key vanish, as if its TTL had run out."""
    assert await broker._commands.delete(keys.gateway_alive(gid)) == 1


async def room_keys(broker: RedisBroker, room: str) -> list[str]:
    """Every key of ``room`` that exists, found by a SCAN of the whole key space."""
    prefix = keys.room(room).stream.removesuffix(":log")
    return sorted(k for k in [text(k) async for k in broker._commands.scan_iter()] if
                  k.startswith(prefix))  # fmt: skip


class Listener:
    """A gateway's subscription, read by a background task as the relay reads it."""

    def __init__(self, broker: RedisBroker, subscription: Subscription) -> None:
        self.broker = broker
        self.subscription = subscription
        self._got: list[Delivery] = []
        self._seen = 0
        self._changed = asyncio.Condition()

    async def pump(self) -> None:
        async for batch in self.subscription.batches():
            async with self._changed:
                self._got += batch
                self._changed.notify_all()

    async def until(self, done: Callable[[Delivery], bool]) -> list[Delivery]:
        """Deliveries not yet returned, up to the first for which ``done`` holds (dropped)."""
        async with asyncio.timeout(5), self._changed:
            while True:
                for index in range(self._seen, len(self._got)):
                    if done(self._got[index]):
                        found = self._got[self._seen : index]
                        self._seen = index + 1
                        return found
                await self._changed.wait()

    async def until_marker(self, room: str = LOBBY) -> list[Delivery]:
        """Publish a marker in ``room`` and return every delivery received before it."""
        assert await self.broker.publish(room, [encode_message("marker", MARKER)])
        return await self.until(
            lambda d: d[0] == room and isinstance(d[1], ChatMessage) and d[1].text == MARKER
        )

    async def next(self, count: int = 1) -> list[Delivery]:
        """The next ``count`` deliveries."""
        async with asyncio.timeout(5), self._changed:
            await self._changed.wait_for(lambda: len(self._got) >= self._seen + count)
            found = self._got[self._seen : self._seen + count]
            self._seen += count
            return found


@asynccontextmanager
async def listen(
    broker: RedisBroker, gid: str = "gw-observer", rooms: tuple[str, ...] = (LOBBY,)
) -> AsyncIterator[Listener]:
    async with broker.subscription(gid, rooms) as subscription:
        listener = Listener(broker, subscription)
        task = asyncio.create_task(listener.pump())
        try:
            yield listener
        finally:
            await stop(task)


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` until it ends: on Python 3.11 the fakeredis client's
    ``asyncio.wait_for`` can drop a cancellation that arrives as a read completes."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    assert task.cancelled()


def events(deliveries: list[Delivery]) -> list[object]:
    return [event for _, event in deliveries]


def leaves(deliveries: list[Delivery]) -> list[tuple[str | None, str, str]]:
    """(room, name, session) of each leave delivered, sorted."""
    found = [(r, e.name, e.session) for r, e in deliveries if isinstance(e, UserLeft)]
    assert len(found) == len(deliveries), deliveries
    return sorted(found, key=lambda f: (f[0] or "", f[1], f[2]))


# -- connect -------------------------------------------------------------------------------


async def test_connect_without_url_gives_a_working_embedded_broker() -> None:
    """connect(None) returns an embedded broker that answers."""
    b = await connect(None)
    try:
        assert isinstance(b, RedisBroker)
        await b.ping()
        assert await b.online() == []
        assert await b.rooms() == []
    finally:
        await b.close()


# -- presence ------------------------------------------------------------------------------


async def test_claim_is_accepted_counted_and_announces_nothing(broker: RedisBroker) -> None:
    """An accepted claim reports the users online and records presence in the default
    room; the join is left to enter()."""
    await register(broker, "gw1")
    async with listen(broker) as listener:
        first = await broker.claim("alice", "Alice", "gw1", "inst", "s1", time.time())
        second = await broker.claim("bob", "Bob", "gw1", "inst", "s2", time.time())
        assert await listener.until_marker() == []
    assert (first.accepted, first.online) == (True, 1)
    assert (second.accepted, second.online) == (True, 2)
    online = sorted(await broker.online(), key=lambda p: p.name)
    assert [(p.name, p.session, p.room, p.room_key) for p in online] == [
        ("Alice", "s1", DEFAULT_ROOM, LOBBY),
        ("Bob", "s2", DEFAULT_ROOM, LOBBY),
    ]
    assert await broker.members(LOBBY) == []


async def test_claim_of_a_taken_key_is_refused(broker: RedisBroker) -> None:
    """A second claim of the same key (any case variant, any gateway) is refused."""
    await register(broker, "gw1")
    await register(broker, "gw2")
    await login(broker, "Alice", "gw1", "s1")
    for variant, gid in (("ALICE", "gw2"), ("alice", "gw1"), ("Alice", "gw2")):
        assert name_key(variant) == "alice"
        refused = await broker.claim(
            name_key(variant), variant, gid, "inst", f"other-{variant}", time.time()
        )
        assert not refused.accepted
    online = await broker.online()
    assert [(p.name, p.gateway, p.session) for p in online] == [("Alice", "gw1", "s1")]
    assert {g.id: g.users for g in await broker.gateways()} == {"gw1": 1, "gw2": 0}


async def test_claim_retried_by_the_same_session_is_accepted_again(broker: RedisBroker) -> None:
    """A claim repeated by the session that holds the name (its reply lost) succeeds and
    changes nothing."""
    await register(broker, "gw1")
    assert (await broker.claim("alice", "Alice", "gw1", "inst", "s1", 1.0)).accepted
    again = await broker.claim("alice", "Alice", "gw1", "inst", "s1", 2.0)
    assert (again.accepted, again.online) == (True, 1)
    [alice] = await broker.online()
    assert (alice.session, alice.since) == ("s1", 1.0)


async def test_claim_with_non_ascii_name_round_trips(broker: RedisBroker) -> None:
    """A non-ASCII display name comes back unchanged in the join event, online(),
    members() and holder()."""
    await register(broker, "gw1")
    async with listen(broker) as listener:
        join_id = await login(broker, "Zoë_Ünal", "gw1", "s1")
        assert events(await listener.next()) == [UserJoined(join_id, "Zoë_Ünal", "gw1", "s1")]
    assert [p.name for p in await broker.online()] == ["Zoë_Ünal"]
    assert await broker.members(LOBBY) == ["Zoë_Ünal"]
    assert await broker.holder(name_key("ZOË_ünal")) == Held("Zoë_Ünal", "s1", "gw1")
    refused = await broker.claim(name_key("ZOË_ünal"), "ZOË_ünal", "gw1", "inst", "s2", 0)
    assert not refused.accepted


async def test_claim_by_an_unregistered_gateway_raises(broker: RedisBroker) -> None:
    """A claim from a gateway that is not live (or not this instance) is BrokerUnavailable."""
    with pytest.raises(BrokerUnavailable):
        await broker.claim("alice", "Alice", "ghost", "inst", "s1", time.time())
    await register(broker, "gw1", instance="A")
    with pytest.raises(BrokerUnavailable):
        await broker.claim("alice", "Alice", "gw1", "B", "s1", time.time())
    await expire(broker, "gw1")
    with pytest.raises(BrokerUnavailable):
        await broker.claim("alice", "Alice", "gw1", "A", "s1", time.time())
    assert await broker.online() == []


async def test_release_by_the_owner_frees_the_name_once(broker: RedisBroker) -> None:
    """release() by the holding session frees the name (True), then finds nothing (False);
    it announces nothing (the leave is the room's business)."""
    await register(broker, "gw1")
    await broker.claim("alice", "Alice", "gw1", "inst", "s1", time.time())
    await broker.touch({"alice": 5.0})
    async with listen(broker) as listener:
        assert await broker.release("alice", "s1", "gw1") is True
        assert await broker.release("alice", "s1", "gw1") is False
        assert await listener.until_marker() == []
    assert await broker.online() == []
    assert await broker.holder("alice") is None
    assert await broker._commands.hexists(keys.ACTIVITY, "alice") == 0
    [gateway] = await broker.gateways()
    assert gateway.users == 0
    assert (await broker.claim("alice", "alice", "gw1", "inst", "s2", time.time())).accepted


async def test_release_by_another_session_does_nothing(broker: RedisBroker) -> None:
    """release() by a session that does not hold the name returns False and changes nothing."""
    await register(broker, "gw1")
    await login(broker, "Alice", "gw1", "s1")
    assert await broker.release("alice", "s2", "gw1") is False
    assert await broker.release("nobody", "s1", "gw1") is False
    assert [(p.name, p.session) for p in await broker.online()] == [("Alice", "s1")]
    [gateway] = await broker.gateways()
    assert gateway.users == 1


async def test_release_after_redis_lost_its_data_is_left_undecided(broker: RedisBroker) -> None:
    """Nobody holds the name and the gateway is not registered (Redis restarted empty):
    release() cannot tell whether a leave is owed and says so with None."""
    assert await broker.release("alice", "s1", "gw1") is None
    await register(broker, "gw1")
    assert await broker.release("alice", "s1", "gw1") is False


async def test_set_room_records_the_room_and_the_one_before(broker: RedisBroker) -> None:
    """set_room() moves a session's presence to a room (kept as typed by its first member)
    and keeps the room it leaves as 'prev'; another session, or a free name, is refused."""
    await register(broker, "gw1")
    await login(broker, "Alice", "gw1", "s1")
    await move(broker, "Alice", "gw1", "s1", MATH, "#Math")
    [alice] = await broker.online()
    assert (alice.room, alice.room_key) == ("#Math", MATH)
    raw = await broker._commands.hget(keys.ONLINE, "alice")
    assert b'"prev":"#lobby"' in raw
    assert await broker.set_room("alice", "s1", MATH) is True  # no move: prev kept
    assert b'"prev":"#lobby"' in await broker._commands.hget(keys.ONLINE, "alice")
    assert await broker.set_room("alice", "other", LOBBY) is False
    assert await broker.set_room("nobody", "s1", LOBBY) is False
    assert [p.room_key for p in await broker.online()] == [MATH]


async def test_touch_records_activity_for_online_users_only(broker: RedisBroker) -> None:
    """touch() stores last-message times shown by online(); names not online are ignored,
    and a release clears the record."""
    await register(broker, "gw-a")
    await login(broker, "alice", "gw-a", "s-a")
    await broker.touch({name_key("alice"): 1_700_000_000.5, name_key("ghost"): 1.0})
    (alice,) = await broker.online()
    assert alice.active == 1_700_000_000.5
    assert await broker._commands.hexists(keys.ACTIVITY, name_key("ghost")) == 0
    await broker.release(name_key("alice"), "s-a")
    assert await broker._commands.hexists(keys.ACTIVITY, name_key("alice")) == 0


# -- rooms ---------------------------------------------------------------------------------


async def test_enter_announces_a_join_once(broker: RedisBroker) -> None:
    """enter() adds a member and announces its join; entering again announces nothing and
    keeps the room's first name."""
    async with listen(broker, rooms=(LOBBY, MATH)) as listener:
        first = await broker.enter(
            MATH, "#Math", [Member("s1", "Alice", "gw1", encode_join("Alice", "gw1", "s1"))]
        )
        again = await broker.enter(
            MATH, "#MATH", [Member("s1", "Alice", "gw1", encode_join("Alice", "gw1", "s1"))]
        )
        second = await broker.enter(
            MATH, "#MATH", [Member("s2", "Bob", "gw2", encode_join("Bob", "gw2", "s2"))]
        )
        received = await listener.until_marker()
    assert (first.members, first.room, len(first.join_ids)) == (1, "#Math", 1)
    assert again == type(again)(1, "#Math", [""])
    assert (second.members, second.room) == (2, "#Math")
    assert received == [
        (MATH, UserJoined(first.join_ids[0], "Alice", "gw1", "s1")),
        (MATH, UserJoined(second.join_ids[0], "Bob", "gw2", "s2")),
    ]
    assert await broker.room_name(MATH) == "#Math"
    assert sorted(await broker.members(MATH)) == ["Alice", "Bob"]


async def test_enter_several_at_once_and_silently(broker: RedisBroker) -> None:
    """enter() takes several members in one step; a member with no join event enters
    silently."""
    async with listen(broker) as listener:
        entered = await broker.enter(
            LOBBY,
            DEFAULT_ROOM,
            [
                Member("s1", "Alice", "gw1", encode_join("Alice", "gw1", "s1")),
                Member("s2", "Bob", "gw1", ""),
                Member("s3", "Carol", "gw1", encode_join("Carol", "gw1", "s3")),
            ],
        )
        received = await listener.until_marker()
    assert entered.members == 3
    assert entered.join_ids[1] == ""
    assert events(received) == [
        UserJoined(entered.join_ids[0], "Alice", "gw1", "s1"),
        UserJoined(entered.join_ids[2], "Carol", "gw1", "s3"),
    ]
    assert sorted(await broker.members(LOBBY)) == ["Alice", "Bob", "Carol"]


async def test_leave_announces_once(broker: RedisBroker) -> None:
    """leave() removes a member and announces its leave; leaving again announces nothing."""
    await broker.enter(LOBBY, DEFAULT_ROOM, [Member("s1", "Alice", "gw1", ""),
                                             Member("s2", "Bob", "gw1", "")])  # fmt: skip
    async with listen(broker) as listener:
        [left] = await broker.leave(LOBBY, [("s1", encode_leave("Alice", "gw1", "s1", "#x"))])
        assert await broker.leave(LOBBY, [("s1", encode_leave("Alice", "gw1", "s1"))]) == [""]
        assert await broker.leave(LOBBY, [("nobody", encode_leave("N", "gw1", "nobody"))]) == [""]
        received = await listener.until_marker()
    assert left
    assert received == [(LOBBY, UserLeft(left, "Alice", "gw1", "s1", "#x"))]
    assert await broker.members(LOBBY) == ["Bob"]


async def test_a_room_is_deleted_with_its_last_member(broker: RedisBroker) -> None:
    """A room other than the default one loses every key when its last member leaves; it
    takes no messages then, and a newcomer starts it afresh under its own name."""
    await broker.enter(MATH, "#Math", [Member("s1", "Alice", "gw1", ""),
                                       Member("s2", "Bob", "gw1", "")])  # fmt: skip
    await broker.publish(MATH, [encode_message("Alice", "hi")])
    assert await room_keys(broker, MATH)
    await broker.leave(MATH, [("s1", encode_leave("Alice", "gw1", "s1"))])
    assert len(await room_keys(broker, MATH)) == 4  # log, members, name, said: in use
    async with listen(broker, rooms=(LOBBY, MATH)) as listener:
        await broker.leave(MATH, [("s2", encode_leave("Bob", "gw1", "s2"))])
        assert await room_keys(broker, MATH) == []
        assert await broker.publish(MATH, [encode_message("ghost", "anyone?")]) == []
        assert await broker.announce("hello", MATH) == 0
        received = await listener.until_marker()
    assert [(r, type(e)) for r, e in received] == [(MATH, UserLeft)]
    assert await room_keys(broker, MATH) == []
    assert await broker.room_name(MATH) is None
    assert await broker.history(MATH, 10) == []
    assert await broker.events_after(MATH, "0-0") == []
    assert await broker.members(MATH) == []

    entered = await broker.enter(MATH, "#MATH", [Member("s3", "Carol", "gw1", "")])
    assert (entered.members, entered.room) == (1, "#MATH")
    assert await broker.history(MATH, 10) == []


async def test_the_default_room_stays_when_empty(broker: RedisBroker) -> None:
    """The default room keeps its stream and name when its last member leaves, and still
    takes messages."""
    await broker.enter(LOBBY, DEFAULT_ROOM, [Member("s1", "Alice", "gw1", "")])
    [hi] = await broker.publish(LOBBY, [encode_message("Alice", "hi")])
    await broker.leave(LOBBY, [("s1", encode_leave("Alice", "gw1", "s1"))])
    lobby = keys.room(LOBBY)
    assert await room_keys(broker, LOBBY) == [lobby.stream, lobby.name, lobby.said]
    assert await broker.room_name(LOBBY) == DEFAULT_ROOM
    [later] = await broker.publish(LOBBY, [encode_message("ghost", "still here")])
    assert [m.id for m in await broker.history(LOBBY, 10)] == [hi, later]


async def test_publish_returns_increasing_ids_delivered_in_order(broker: RedisBroker) -> None:
    """publish() ids increase and the subscription yields the same messages, ids and
    order, tagged with the room: the messages of one call as one run, their lines ready
    to send."""
    texts = [f"message {i}" for i in range(5)]
    async with listen(broker) as listener:
        ids = await broker.publish(LOBBY, [encode_message("alice", t) for t in texts[:3]])
        ids += await broker.publish(LOBBY, [encode_message("bob", t) for t in texts[3:]])
        received = await listener.next(2)
    assert len(ids) == len(texts)
    assert [stream_id_key(i) for i in ids] == sorted({stream_id_key(i) for i in ids})
    assert received == [
        (LOBBY, ChatRun(tuple(ids[:3]), b"alice: message 0\nalice: message 1\nalice: message 2\n")),
        (LOBBY, ChatRun(tuple(ids[3:]), b"bob: message 3\nbob: message 4\n")),
    ]
    messages = [m for _, run in received if isinstance(run, ChatRun) for m in run.messages()]
    assert messages == [
        ChatMessage(i, "alice" if n < 3 else "bob", t)
        for n, (i, t) in enumerate(zip(ids, texts, strict=True))
    ]


async def test_publish_of_nothing_returns_no_ids(broker: RedisBroker) -> None:
    """publish(room, []) appends nothing and returns an empty list."""
    assert await broker.publish(LOBBY, []) == []
    assert await broker.events_after(LOBBY, "0-0") == []


async def test_rooms_are_isolated(broker: RedisBroker) -> None:
    """Each room has its own stream, history and channel: a subscription to one room gets
    nothing of another."""
    other = room_key("#Art")
    await broker.enter(MATH, "#Math", [Member("s1", "Alice", "gw1", "")])
    await broker.enter(other, "#Art", [Member("s2", "Bob", "gw1", "")])
    async with listen(broker, rooms=(LOBBY, MATH)) as listener:
        [in_math] = await broker.publish(MATH, [encode_message("Alice", "integrals")])
        [in_art] = await broker.publish(other, [encode_message("Bob", "colours")])
        [in_lobby] = await broker.publish(LOBBY, [encode_message("Carol", "hello")])
        received = await listener.until_marker()
    assert received == [
        (MATH, ChatMessage(in_math, "Alice", "integrals")),
        (LOBBY, ChatMessage(in_lobby, "Carol", "hello")),
    ]
    assert await broker.history(MATH, 10) == [ChatMessage(in_math, "Alice", "integrals")]
    assert await broker.history(other, 10) == [ChatMessage(in_art, "Bob", "colours")]
    assert await broker.events_after(other, "0-0") == [ChatMessage(in_art, "Bob", "colours")]
    assert [m.text for m in await broker.history(LOBBY, 10)] == ["hello", MARKER]
    assert await broker.members(MATH) == ["Alice"]
    assert await broker.members(other) == ["Bob"]


async def test_subscription_follows_rooms_added_and_removed(broker: RedisBroker) -> None:
    """A room added to a subscription is delivered once add() returns; once removed, its
    events no longer arrive."""
    await broker.enter(MATH, "#Math", [Member("s1", "Alice", "gw1", "")])
    async with listen(broker) as listener:
        await broker.publish(MATH, [encode_message("Alice", "before")])
        await listener.subscription.add(MATH)
        assert listener.subscription.rooms == {LOBBY, MATH}
        [during] = await broker.publish(MATH, [encode_message("Alice", "during")])
        assert await listener.until_marker() == [(MATH, ChatMessage(during, "Alice", "during"))]
        await listener.subscription.remove(MATH)
        assert listener.subscription.rooms == {LOBBY}
        await broker.publish(MATH, [encode_message("Alice", "after")])
        assert await listener.until_marker() == []


async def test_events_after_returns_exactly_the_later_events(broker: RedisBroker) -> None:
    """events_after(room, id) returns only what came after id in that room, in order."""
    await register(broker, "gw1")
    join_id = await login(broker, "Alice", "gw1", "s1")
    msg_ids = await broker.publish(
        LOBBY, [encode_message("Alice", "hi"), encode_message("Alice", "yo")]
    )
    [leave_id] = await broker.leave(LOBBY, [("s1", encode_leave("Alice", "gw1", "s1"))])
    everything = await broker.events_after(LOBBY, "0-0")
    assert everything == [
        UserJoined(join_id, "Alice", "gw1", "s1"),
        ChatMessage(msg_ids[0], "Alice", "hi"),
        ChatMessage(msg_ids[1], "Alice", "yo"),
        UserLeft(leave_id, "Alice", "gw1", "s1"),
    ]
    assert await broker.events_after(LOBBY, join_id) == everything[1:]
    assert await broker.events_after(LOBBY, msg_ids[0]) == everything[2:]
    assert await broker.events_after(LOBBY, leave_id) == []


async def test_history_returns_the_last_messages_of_the_room(broker: RedisBroker) -> None:
    """history() gives the last chat messages (not joins, leaves or notices, however many
    came since: a login storm's thousands of joins included), oldest first, and only those
    before a given id when asked."""
    ids = []
    for n in range(5):
        ids += await broker.publish(LOBBY, [encode_message("A", f"m{n}")])
        await broker.enter(
            LOBBY, DEFAULT_ROOM, [Member(f"x{n}", "X", "g", encode_join("X", "g", f"x{n}"))]
        )
    crowd = [Member(f"c{n}", f"C{n}", "g", encode_join(f"C{n}", "g", f"c{n}")) for n in range(3000)]
    await broker.enter(LOBBY, DEFAULT_ROOM, crowd)
    await broker.announce("maintenance at noon", LOBBY)
    assert [m.text for m in await broker.history(LOBBY, 3)] == ["m2", "m3", "m4"]
    assert [m.text for m in await broker.history(LOBBY, 10)] == [f"m{n}" for n in range(5)]
    assert [m.id for m in await broker.history(LOBBY, 2, before=ids[3])] == ids[1:3]
    assert await broker.history(LOBBY, 2, before=ids[0]) == []
    assert await broker.history(MATH, 3) == []


async def test_rooms_and_members_list_who_is_where(broker: RedisBroker) -> None:
    """rooms() lists every room that has users, by name as shown, with its size, sorted;
    members() names a room's members."""
    await register(broker, "gw1")
    await register(broker, "gw2")
    await login(broker, "Alice", "gw1", "s1")
    await login(broker, "Bob", "gw2", "s2")
    await login(broker, "Carol", "gw2", "s3")
    await login(broker, "Dan", "gw1", "s4")
    await move(broker, "Bob", "gw2", "s2", MATH, "#Math")
    await move(broker, "Carol", "gw2", "s3", MATH, "#Math")
    await move(broker, "Dan", "gw1", "s4", room_key("#art"), "#art")
    assert await broker.rooms() == [("#art", 1), ("#lobby", 1), ("#Math", 2)]
    assert await broker.members(LOBBY) == ["Alice"]
    assert sorted(await broker.members(MATH)) == ["Bob", "Carol"]
    assert {p.name: p.room for p in await broker.online()} == {
        "Alice": "#lobby",
        "Bob": "#Math",
        "Carol": "#Math",
        "Dan": "#art",
    }


async def test_announce_reaches_every_room_in_use_and_the_default_one(broker: RedisBroker) -> None:
    """announce() without a room sends one notice to the default room and to each room
    with users; with a room, to that room alone."""
    await register(broker, "gw1")
    await login(broker, "Alice", "gw1", "s1")
    await move(broker, "Alice", "gw1", "s1", MATH, "#Math")
    async with listen(broker, rooms=(LOBBY, MATH)) as listener:
        assert await broker.announce("maintenance at noon") == 2
        assert await broker.announce("math only", MATH) == 1
        received = await listener.until_marker()
    assert sorted((r, e.text) for r, e in received if isinstance(e, Announcement)) == [
        (LOBBY, "maintenance at noon"),
        (MATH, "maintenance at noon"),
        (MATH, "math only"),
    ]
    assert len(received) == 3


# -- private delivery and kicks --------------------------------------------------------------


async def test_private_message_goes_to_the_holders_gateway_alone(broker: RedisBroker) -> None:
    """send_private() reaches the inbox of the gateway holding the name, not any other
    gateway's, and names the recipient as shown."""
    await register(broker, "gw1")
    await register(broker, "gw2")
    await login(broker, "Alice", "gw1", "s1")
    await login(broker, "Bob", "gw2", "s2")
    async with listen(broker, "gw1") as gw1, listen(broker, "gw2") as gw2:
        assert await broker.send_private("alice", "Bob", "psst") == "Alice"
        assert await broker.send_private("nobody", "Bob", "hello?") is None
        assert await gw1.until_marker() == [(None, PrivateDelivery("alice", "Bob", "psst"))]
        assert await gw2.until_marker() == []


async def test_private_message_to_a_gateway_not_listening_is_unavailable(
    broker: RedisBroker,
) -> None:
    """send_private() raises BrokerUnavailable when the holder's gateway has no inbox
    subscription (nobody received it)."""
    await register(broker, "gw1")
    await login(broker, "Alice", "gw1", "s1")
    async with listen(broker, "gw2"):
        with pytest.raises(BrokerUnavailable):
            await broker.send_private("alice", "Bob", "psst")


async def test_kick_reaches_the_holders_gateway_alone(broker: RedisBroker) -> None:
    """kick() names the holder and reaches its gateway's inbox only; no holder gives None."""
    await register(broker, "gw-a")
    await register(broker, "gw-b")
    await login(broker, "Mallory", "gw-a", "s-m")
    async with listen(broker, "gw-a") as gw_a, listen(broker, "gw-b") as gw_b:
        target = await broker.kick(name_key("MALLORY"), "spam")
        assert target == Held("Mallory", "s-m", "gw-a")
        assert await broker.kick(name_key("nobody"), "x") is None
        assert await gw_a.until_marker() == [(None, UserKicked("mallory", "spam"))]
        assert await gw_b.until_marker() == []


# -- gateway liveness ----------------------------------------------------------------------


async def test_heartbeat_is_true_while_registered(broker: RedisBroker) -> None:
    """heartbeat() renews a registered gateway and returns True."""
    await register(broker, "gw1", instance="A", ttl=5)
    assert await broker.heartbeat("gw1", "A", 20) is True
    [record] = await broker.gateways()
    assert record.ttl_left is not None
    assert 5 < record.ttl_left <= 20


async def test_heartbeat_after_expiry_but_before_reap_restores_liveness(
    broker: RedisBroker,
) -> None:
    """A gateway whose key lapsed but which was not reaped yet is renewed by heartbeat()."""
    await register(broker, "gw1", instance="A")
    await login(broker, "Alice", "gw1", "s1", instance="A")
    await expire(broker, "gw1")
    assert await broker.heartbeat("gw1", "A", TTL) is True
    assert await broker.reap_dead_gateways() == {}
    assert [p.name for p in await broker.online()] == ["Alice"]


async def outage(broker: RedisBroker, *gids: str) -> None:
    """What an outage longer than the liveness TTL leaves behind: nobody's heartbeat got
    through, so the pulse and every gateway's liveness key ran out."""
    await broker._commands.delete(keys.PULSE)
    for gid in gids:
        await expire(broker, gid)


async def test_after_an_outage_nobody_is_reaped_until_the_peers_could_renew(
    broker: RedisBroker,
) -> None:
    """The first heartbeat after an outage that let every liveness key lapse opens a grace
    of one TTL: a peer whose key lapsed meanwhile is not reaped, and renews when its own
    heartbeat gets through; a peer that never renews is reaped once the grace is over."""
    for gid in ("first", "late", "dead"):
        await register(broker, gid)
    await login(broker, "Alice", "late", "s1")
    await login(broker, "Dan", "dead", "s2")
    assert await broker.heartbeat("first", "inst", TTL) is True
    await outage(broker, "first", "late", "dead")
    assert await broker.heartbeat("first", "inst", TTL) is True
    assert await broker.reap_dead_gateways() == {}
    assert 0 < await broker._commands.pttl(keys.GRACE) <= TTL * 1000
    assert await broker.heartbeat("late", "inst", TTL) is True
    await broker._commands.delete(keys.GRACE)  # the grace ran out
    assert await broker.heartbeat("first", "inst", TTL) is True
    assert await broker.reap_dead_gateways() == {"dead": 1}
    assert [p.name for p in await broker.online()] == ["Alice"]


async def test_a_heartbeat_while_the_pulse_beats_opens_no_grace(broker: RedisBroker) -> None:
    """While heartbeats keep coming (and on a fresh Redis, which has nobody to spare), a
    gateway whose key lapsed is reaped at once."""
    await register(broker, "live")
    await register(broker, "dead")
    assert await broker.heartbeat("live", "inst", TTL) is True
    await expire(broker, "dead")
    assert await broker.heartbeat("live", "inst", TTL) is True
    assert await broker._commands.exists(keys.GRACE) == 0
    pulse = await broker._commands.pttl(keys.PULSE)
    assert 0 < pulse <= TTL * 1000 / 2
    assert await broker.reap_dead_gateways() == {"dead": 0}


async def test_a_gateway_back_after_an_outage_opens_the_grace_too(broker: RedisBroker) -> None:
    """A registration (a gateway restarted during the outage) or a restore that finds the
    pulse gone opens the grace as a heartbeat does."""
    await register(broker, "other")
    await register(broker, "restarted", instance="A")
    await outage(broker, "other", "restarted")
    assert await register(broker, "restarted", instance="B") == 0
    assert await broker._commands.exists(keys.GRACE) == 1
    assert await broker.reap_dead_gateways() == {}
    await broker._commands.delete(keys.GRACE, keys.PULSE)
    await broker.deregister_gateway("restarted", "B")
    assert await broker.restore_gateway("restarted", "B", "x:1", time.time(), TTL, []) == []
    assert await broker._commands.exists(keys.GRACE) == 1


async def test_heartbeat_is_false_after_deregistration(broker: RedisBroker) -> None:
    """heartbeat() after deregister_gateway() reports the registration lost."""
    await register(broker, "gw1", instance="A")
    await broker.deregister_gateway("gw1", "A")
    assert await broker.heartbeat("gw1", "A", TTL) is False
    assert await broker.gateways() == []


async def test_heartbeat_is_false_after_reap(broker: RedisBroker) -> None:
    """heartbeat() of a gateway reaped by a peer reports the registration lost."""
    await register(broker, "gw1", instance="A")
    await expire(broker, "gw1")
    assert await broker.reap_dead_gateways() == {"gw1": 0}
    assert await broker.heartbeat("gw1", "A", TTL) is False
    assert await broker.heartbeat("never-registered", "A", TTL) is False


async def test_heartbeat_raises_when_another_instance_took_the_id(broker: RedisBroker) -> None:
    """heartbeat() raises GatewayIdInUse once another instance registered the same id."""
    await register(broker, "gw1", instance="A")
    await expire(broker, "gw1")
    await register(broker, "gw1", instance="B")
    with pytest.raises(GatewayIdInUse):
        await broker.heartbeat("gw1", "A", TTL)
    assert await broker.heartbeat("gw1", "B", TTL) is True


async def test_register_of_a_live_id_by_another_instance_raises(broker: RedisBroker) -> None:
    """register_gateway() refuses an id held live by another instance, leaving it intact."""
    assert await register(broker, "gw1", instance="A") == 0
    await login(broker, "Alice", "gw1", "A-1", instance="A")
    with pytest.raises(GatewayIdInUse):
        await register(broker, "gw1", instance="B")
    [record] = await broker.gateways()
    assert (record.instance, record.users) == ("A", 1)
    assert await broker.heartbeat("gw1", "A", TTL) is True
    assert await register(broker, "gw1", instance="A") == 0  # the same instance may renew
    assert [p.session for p in await broker.online()] == ["A-1"]


async def test_reregistration_after_expiry_evicts_the_old_users(broker: RedisBroker) -> None:
    """Registering again after the old instance expired evicts its users, each leave
    announced once in the room it is in; the new instance's own sessions are kept."""
    await register(broker, "gw1", instance="A")
    await login(broker, "Alice", "gw1", "A-1", instance="A")
    await login(broker, "Bob", "gw1", "A-2", instance="A")
    await move(broker, "Bob", "gw1", "A-2", MATH, "#Math")
    await expire(broker, "gw1")
    # B's registration went through but its eviction did not (the link broke), and B has
    # a user of its own by the time it registers again.
    await broker._global("register", ("gw1", "B", "{}", 30_000))
    await login(broker, "Carol", "gw1", "B-1", instance="B")
    async with listen(broker, rooms=(LOBBY, MATH)) as listener:
        assert await register(broker, "gw1", instance="B") == 2
        received = await listener.until_marker()
    assert leaves(received) == [(LOBBY, "Alice", "A-1"), (MATH, "Bob", "A-2")]
    assert [(p.name, p.session) for p in await broker.online()] == [("Carol", "B-1")]
    [record] = await broker.gateways()
    assert (record.instance, record.users) == ("B", 1)
    assert await room_keys(broker, MATH) == []


async def test_reap_announces_each_leave_once_in_the_users_rooms(broker: RedisBroker) -> None:
    """reap_dead_gateways() evicts only expired gateways: each user's leave is announced
    once in its room, and in the room it was leaving when a move was cut short; a second
    reap does nothing."""
    await register(broker, "dead")
    await register(broker, "live")
    await login(broker, "Alice", "dead", "s1")
    await login(broker, "Bob", "dead", "s2")
    await login(broker, "Dan", "dead", "s4")
    await login(broker, "Carol", "live", "s3")
    await move(broker, "Alice", "dead", "s1", MATH, "#Math", leave=False)  # cut short
    await move(broker, "Bob", "dead", "s2", MATH, "#Math")  # complete: 'prev' is the lobby
    async with listen(broker, rooms=(LOBBY, MATH)) as listener:
        await expire(broker, "dead")
        assert await broker.reap_dead_gateways() == {"dead": 3}
        first = await listener.until_marker()
        assert await broker.reap_dead_gateways() == {}
        second = await listener.until_marker()
    assert leaves(first) == [
        (LOBBY, "Alice", "s1"),
        (LOBBY, "Dan", "s4"),
        (MATH, "Alice", "s1"),
        (MATH, "Bob", "s2"),
    ]
    assert all(isinstance(e, UserLeft) and (e.gateway, e.to) == ("dead", "") for e in events(first))
    assert second == []
    assert [(p.name, p.gateway) for p in await broker.online()] == [("Carol", "live")]
    assert await broker.members(LOBBY) == ["Carol"]
    assert await room_keys(broker, MATH) == []
    [record] = await broker.gateways()
    assert (record.id, record.users) == ("live", 1)
    assert await broker._commands.smembers(keys.REAPING) == set()
    assert (await broker.claim("alice", "Alice", "live", "inst", "s5", time.time())).accepted


async def test_registering_again_takes_the_id_off_the_reaping_queue(broker: RedisBroker) -> None:
    """A reaper died after queuing a dead gateway that held no users: once a new instance
    registers under that id, no reap evicts the new instance's users."""
    await register(broker, "gw1", instance="A")
    await expire(broker, "gw1")
    assert [text(g) for g in await broker._global("reap", ())] == ["gw1"]  # reaper died here
    assert await register(broker, "gw1", instance="B") == 0
    await login(broker, "Carol", "gw1", "B-1", instance="B")
    assert await broker.reap_dead_gateways() == {}
    assert [p.name for p in await broker.online()] == ["Carol"]


async def test_concurrent_evictions_announce_each_leave_once(broker: RedisBroker) -> None:
    """Two reapers evicting the same dead gateway at once announce each leave once, and
    one of them reports it."""
    await register(broker, "dead")
    for n in range(5):
        await login(broker, f"user{n}", "dead", f"s{n}")
    await expire(broker, "dead")
    async with listen(broker) as listener:
        results = await asyncio.gather(broker.reap_dead_gateways(), broker.reap_dead_gateways())
        received = await listener.until_marker()
    assert leaves(received) == [(LOBBY, f"user{n}", f"s{n}") for n in range(5)]
    assert [set(r) for r in results if r] == [{"dead"}]  # one of them reports the reap
    assert await broker.online() == []


async def test_reap_after_a_real_ttl_expiry(broker: RedisBroker) -> None:
    """A gateway that registered with a tiny TTL and never renewed is reaped."""
    await register(broker, "short", ttl=0.05)
    await login(broker, "Alice", "short", "s1")
    for _ in range(500):  # bounded poll: what we wait for is the TTL itself
        if not await broker._commands.exists(keys.gateway_alive("short")):
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the liveness key did not expire")
    [record] = await broker.gateways()
    assert record.ttl_left is None
    assert await broker.reap_dead_gateways() == {"short": 1}
    assert await broker.online() == []
    assert await broker.members(LOBBY) == []


async def test_deregister_announces_every_leave_and_forgets_the_gateway(
    broker: RedisBroker,
) -> None:
    """deregister_gateway() announces each of its users' leaves in their rooms and removes
    the gateway; other gateways' users stay."""
    await register(broker, "gw1")
    await register(broker, "gw2")
    await login(broker, "Alice", "gw1", "s1")
    await login(broker, "Bob", "gw1", "s2")
    await login(broker, "Carol", "gw2", "s3")
    await move(broker, "Bob", "gw1", "s2", MATH, "#Math")
    async with listen(broker, rooms=(LOBBY, MATH)) as listener:
        assert await broker.deregister_gateway("gw1", "inst") == 2
        received = await listener.until_marker()
    assert leaves(received) == [(LOBBY, "Alice", "s1"), (MATH, "Bob", "s2")]
    assert [g.id for g in await broker.gateways()] == ["gw2"]
    assert [p.name for p in await broker.online()] == ["Carol"]
    assert await broker.reap_dead_gateways() == {}


async def test_deregister_by_another_instance_of_a_live_id_does_nothing(
    broker: RedisBroker,
) -> None:
    """deregister_gateway() with the wrong instance leaves the live gateway registered."""
    await register(broker, "gw1", instance="A")
    await broker.deregister_gateway("gw1", "B")
    assert [g.id for g in await broker.gateways()] == ["gw1"]
    assert await broker.heartbeat("gw1", "A", TTL) is True


async def test_restore_finishes_an_eviction_under_way_then_restores(broker: RedisBroker) -> None:
    """restore_gateway() on a gateway a reaper queued but did not evict (the script says
    -2) finishes the eviction, each leave announced once, then restores its users."""
    await register(broker, "gw1", instance="A")
    await login(broker, "Alice", "gw1", "A-1", instance="A")
    await expire(broker, "gw1")
    assert [text(g) for g in await broker._global("reap", ())] == ["gw1"]  # reaper died here
    users = [("alice", "Alice", "A-1", 1_700_000_000.0, LOBBY)]
    status = await broker._global("restore", ["gw1", "A", "{}", 30_000, *users[0]])
    assert [int(s) for s in status] == [-2]
    async with listen(broker) as listener:
        assert await broker.restore_gateway("gw1", "A", "gw1:1", time.time(), TTL, users) == []
        received = await listener.until_marker()
    assert leaves(received) == [(LOBBY, "Alice", "A-1")]
    assert await broker._commands.smembers(keys.REAPING) == set()
    [alice] = await broker.online()
    assert (alice.name, alice.session, alice.gateway, alice.since) == (
        "Alice", "A-1", "gw1", 1_700_000_000.0
    )  # fmt: skip
    assert await broker.members(LOBBY) == []  # rooms are the caller's to enter again
    assert await broker.heartbeat("gw1", "A", TTL) is True
    [record] = await broker.gateways()
    assert record.users == 1


async def test_restore_after_redis_lost_its_data(broker: RedisBroker) -> None:
    """restore_gateway() after Redis restarted empty registers again and restores presence
    in each user's room; names taken meanwhile by another session are reported, not taken."""
    await register(broker, "gw1", instance="A")
    await register(broker, "gw2", instance="B")
    await login(broker, "Alice", "gw1", "A-1", instance="A")
    await broker._commands.flushall()
    assert await broker.heartbeat("gw1", "A", TTL) is False
    await register(broker, "gw2", instance="B")
    await broker.claim("bob", "Bob", "gw2", "B", "B-1", time.time())
    refused = await broker.restore_gateway(
        "gw1", "A", "gw1:1", time.time(), TTL,
        [("alice", "Alice", "A-1", 1.0, MATH), ("bob", "Bob", "A-2", 1.0, LOBBY)],
    )  # fmt: skip
    assert refused == ["bob"]
    assert sorted((p.name, p.session, p.room_key) for p in await broker.online()) == [
        ("Alice", "A-1", MATH),
        ("Bob", "B-1", LOBBY),
    ]
    assert await broker.heartbeat("gw1", "A", TTL) is True
    # Restoring again (a retry after a lost reply) changes nothing.
    assert await broker.restore_gateway(
        "gw1", "A", "gw1:1", time.time(), TTL, [("alice", "Alice", "A-1", 1.0, MATH)]
    ) == []  # fmt: skip
    assert len(await broker.online()) == 2


async def test_restore_of_an_id_another_instance_holds_raises(broker: RedisBroker) -> None:
    """restore_gateway() raises GatewayIdInUse if another live instance holds the id, and
    restores nothing."""
    await register(broker, "gw1", instance="B")
    with pytest.raises(GatewayIdInUse):
        await broker.restore_gateway(
            "gw1", "A", "gw1:1", time.time(), TTL, [("alice", "Alice", "A-1", 1.0, LOBBY)]
        )
    assert await broker.online() == []
    [record] = await broker.gateways()
    assert record.instance == "B"


async def test_online_and_gateways_report_what_was_registered(broker: RedisBroker) -> None:
    """online() and gateways() report registrations, user counts, and remaining TTLs."""
    started = 1_700_000_000.5
    await broker.register_gateway("gw1", "A", "one.example:7000", started, 10)
    await broker.register_gateway("gw2", "B", "two.example:7001", started + 1, 20)
    since = 1_700_000_100.25
    await broker.claim("alice", "Alice", "gw1", "A", "s1", since)
    await broker.claim("bob", "Bob", "gw1", "A", "s2", since + 1)
    await broker.claim("carol", "Carol", "gw2", "B", "s3", since + 2, MATH)

    online = sorted(await broker.online(), key=lambda p: p.name)
    assert [(p.name, p.gateway, p.session, p.room_key) for p in online] == [
        ("Alice", "gw1", "s1", LOBBY),
        ("Bob", "gw1", "s2", LOBBY),
        ("Carol", "gw2", "s3", MATH),
    ]
    assert [p.since for p in online] == pytest.approx([since, since + 1, since + 2], abs=1e-3)
    assert [p.active for p in online] == [None, None, None]

    records = {g.id: g for g in await broker.gateways()}
    assert set(records) == {"gw1", "gw2"}
    for gid, address, instance, start, users, ttl in (
        ("gw1", "one.example:7000", "A", started, 2, 10.0),
        ("gw2", "two.example:7001", "B", started + 1, 1, 20.0),
    ):
        record = records[gid]
        assert (record.address, record.instance, record.users, record.ttl) == (
            address,
            instance,
            users,
            ttl,
        )
        assert record.started == pytest.approx(start, abs=1e-3)
        assert record.ttl_left is not None
        assert 0 < record.ttl_left <= ttl


# -- forced leaves ---------------------------------------------------------------------------


async def test_force_leave_announces_once_per_session(broker: RedisBroker) -> None:
    """force_leave() announces the leave of a member Redis forgot, removing it if it is
    listed; a retry for the same session announces nothing more."""
    await broker.enter(LOBBY, DEFAULT_ROOM, [Member("s-old", "Bob", "gw1", ""),
                                             Member("s-x", "Eve", "gw1", "")])  # fmt: skip
    async with listen(broker) as listener:
        leave = encode_leave("Bob", "gw1", "s-old")
        assert await broker.force_leave(LOBBY, "s-old", leave) is True
        assert await broker.force_leave(LOBBY, "s-old", leave) is False
        assert await broker.force_leave(LOBBY, "s-gone", encode_leave("Al", "gw1", "s-gone"))
        received = await listener.until_marker()
    assert [(type(e), e.name) for e in events(received)] == [(UserLeft, "Bob"), (UserLeft, "Al")]
    assert await broker.members(LOBBY) == ["Eve"]


async def test_force_leave_empties_a_room_once(broker: RedisBroker) -> None:
    """force_leave() of a room's last member deletes the room; a retry announces nothing
    and leaves no room behind."""
    await broker.enter(MATH, "#Math", [Member("s1", "Bob", "gw1", "")])
    async with listen(broker, rooms=(LOBBY, MATH)) as listener:
        leave = encode_leave("Bob", "gw1", "s1")
        assert await broker.force_leave(MATH, "s1", leave) is True
        assert await broker.force_leave(MATH, "s1", leave) is False
        received = await listener.until_marker()
    assert [(r, type(e)) for r, e in received] == [(MATH, UserLeft)]
    assert await broker.members(MATH) == []
    assert await broker.room_name(MATH) is None
    # Only the session's "left" mark remains, and it expires.
    [mark] = await room_keys(broker, MATH)
    assert mark == keys.room(MATH).left_mark("s1")
    assert 0 < await broker._commands.pttl(mark) <= keys.LEFT_MARK_TTL_MS


async def test_epoch_changes_only_when_redis_loses_its_data(broker: RedisBroker) -> None:
    """epoch() is stable while Redis keeps its data, and new after it lost it."""
    first = await broker.epoch()
    assert await broker.epoch() == first
    await broker._commands.flushall()
    assert await broker.epoch() != first


# -- redact_url ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:s3cret@redis.example:6380/2", "redis://user:***@redis.example:6380/2"),
        ("redis://:s3cret@redis.example/0", "redis://:***@redis.example/0"),
        (
            "rediss://u:s3cret@redis.example:6379/1?ssl=1",
            "rediss://u:***@redis.example:6379/1?ssl=1",
        ),
    ],
)
def test_redact_url_hides_the_password(url: str, expected: str) -> None:
    """redact_url() replaces the password and keeps everything else."""
    redacted = redact_url(url)
    assert "s3cret" not in redacted
    assert redacted == expected


def test_redact_url_keeps_an_ipv6_host_intact() -> None:
    """redact_url() keeps the brackets of an IPv6 host, so the host and port stay readable."""
    assert redact_url("redis://:s3cret@[::1]:6379/0") == "redis://:***@[::1]:6379/0"


@pytest.mark.parametrize(
    "url",
    [
        "redis://redis.example:6379/0",
        "redis://user@redis.example:6379",
        "unix:///var/run/redis.sock?db=1",
        "redis://localhost",
    ],
)
def test_redact_url_leaves_a_url_without_password_unchanged(url: str) -> None:
    """redact_url() returns a URL with no password exactly as given."""
    assert redact_url(url) == url
