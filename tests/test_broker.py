"""The broker layer on an embedded fakeredis server: presence, the room bus, liveness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from broker import (
    BrokerUnavailable,
    ChatMessage,
    EventDecodeError,
    GatewayIdInUse,
    RedisBroker,
    RoomEvent,
    UserJoined,
    UserLeft,
    connect,
    keys,
    redact_url,
    stream_id_key,
)
from broker.events import decode_bus_message, decode_event, encode_message
from chatwire.names import name_key

TTL = 30.0
MARKER = "--marker--"


@pytest.fixture
async def broker() -> AsyncIterator[RedisBroker]:
    b = RedisBroker.embedded()
    try:
        yield b
    finally:
        await b.close()


async def register(broker: RedisBroker, gid: str, instance: str = "inst", ttl: float = TTL) -> int:
    return await broker.register_gateway(gid, instance, f"{gid}.example:7000", time.time(), ttl)


async def claim(
    broker: RedisBroker, name: str, gid: str, session: str, instance: str = "inst"
) -> str:
    """Claim ``name`` (keyed as the gateway keys it) and return the join event id."""
    result = await broker.claim(name_key(name), name, gid, instance, session, time.time())
    assert result.accepted, f"claim of {name} refused"
    return result.event_id


async def expire(broker: RedisBroker, gid: str) -> None:
    """Make ``gid``'s liveness key vanish, as if its TTL had run out."""
    assert await broker._commands.delete(keys.gateway_alive(gid)) == 1


async def until_marker(broker: RedisBroker, events: AsyncIterator[RoomEvent]) -> list[RoomEvent]:
    """Publish a marker message and return every event received before it."""
    await broker.publish([encode_message("marker", MARKER)])
    received: list[RoomEvent] = []
    async with asyncio.timeout(5):
        async for event in events:
            if isinstance(event, ChatMessage) and event.text == MARKER:
                return received
            received.append(event)
    raise AssertionError("the subscription ended before the marker")


async def next_event(events: AsyncIterator[RoomEvent]) -> RoomEvent:
    async with asyncio.timeout(5):
        return await anext(events)


# -- connect -------------------------------------------------------------------------------


async def test_connect_without_url_gives_a_working_embedded_broker() -> None:
    """connect(None) returns an embedded broker that answers."""
    b = connect(None)
    try:
        assert isinstance(b, RedisBroker)
        await b.ping()
        assert await b.online() == []
    finally:
        await b.close()


# -- presence ------------------------------------------------------------------------------


async def test_claim_is_accepted_counted_and_announced(broker: RedisBroker) -> None:
    """An accepted claim reports the room size and its join arrives with the claim's id."""
    await register(broker, "gw1")
    async with broker.subscribe() as events, aclosing(events):
        first = await broker.claim("alice", "Alice", "gw1", "inst", "s1", time.time())
        assert first.accepted
        assert first.online == 1
        assert first.event_id
        assert await next_event(events) == UserJoined(first.event_id, "Alice", "gw1", "s1", 1)

        second = await broker.claim("bob", "Bob", "gw1", "inst", "s2", time.time())
        assert second.accepted
        assert second.online == 2
        assert await next_event(events) == UserJoined(second.event_id, "Bob", "gw1", "s2", 2)
    assert stream_id_key(second.event_id) > stream_id_key(first.event_id)


async def test_claim_of_a_taken_key_is_refused_and_announces_nothing(
    broker: RedisBroker,
) -> None:
    """A second claim of the same key (any case variant of the name) is refused silently."""
    await register(broker, "gw1")
    await register(broker, "gw2")
    await claim(broker, "Alice", "gw1", "s1")
    async with broker.subscribe() as events, aclosing(events):
        for variant, gid in (("ALICE", "gw2"), ("alice", "gw1"), ("Alice", "gw2")):
            assert name_key(variant) == "alice"
            refused = await broker.claim(
                name_key(variant), variant, gid, "inst", f"other-{variant}", time.time()
            )
            assert not refused.accepted
            assert refused.event_id == ""
        assert await until_marker(broker, events) == []
    online = await broker.online()
    assert [(p.name, p.gateway, p.session) for p in online] == [("Alice", "gw1", "s1")]


async def test_claim_with_non_ascii_name_round_trips(broker: RedisBroker) -> None:
    """A non-ASCII display name comes back unchanged in the join event and in online()."""
    await register(broker, "gw1")
    async with broker.subscribe() as events, aclosing(events):
        event_id = await claim(broker, "Zoë_Ünal", "gw1", "s1")
        assert await next_event(events) == UserJoined(event_id, "Zoë_Ünal", "gw1", "s1", 1)
    assert [p.name for p in await broker.online()] == ["Zoë_Ünal"]
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


async def test_release_by_the_owner_announces_the_leave_once_and_frees_the_name(
    broker: RedisBroker,
) -> None:
    """release() by the holding session announces one UserLeft and frees the name."""
    await register(broker, "gw1")
    await claim(broker, "Alice", "gw1", "s1")
    async with broker.subscribe() as events, aclosing(events):
        assert await broker.release("alice", "s1", "gw1") is True
        assert await broker.release("alice", "s1", "gw1") is False
        received = await until_marker(broker, events)
    assert len(received) == 1
    leave = received[0]
    assert isinstance(leave, UserLeft)
    assert (leave.name, leave.gateway, leave.session) == ("Alice", "gw1", "s1")
    assert await broker.online() == []
    [gateway] = await broker.gateways()
    assert gateway.users == 0
    assert (await broker.claim("alice", "alice", "gw1", "inst", "s2", time.time())).accepted


async def test_release_by_another_session_does_nothing(broker: RedisBroker) -> None:
    """release() by a session that does not hold the name returns False and changes nothing."""
    await register(broker, "gw1")
    await claim(broker, "Alice", "gw1", "s1")
    async with broker.subscribe() as events, aclosing(events):
        assert await broker.release("alice", "s2", "gw1") is False
        assert await broker.release("nobody", "s1", "gw1") is False
        assert await until_marker(broker, events) == []
    assert [(p.name, p.session) for p in await broker.online()] == [("Alice", "s1")]
    [gateway] = await broker.gateways()
    assert gateway.users == 1


# -- the room bus --------------------------------------------------------------------------


async def test_publish_returns_increasing_ids_delivered_in_order(broker: RedisBroker) -> None:
    """publish() ids increase and the subscription yields the same events, ids and order."""
    texts = [f"message {i}" for i in range(5)]
    async with broker.subscribe() as events, aclosing(events):
        ids = await broker.publish([encode_message("alice", t) for t in texts[:3]])
        ids += await broker.publish([encode_message("bob", t) for t in texts[3:]])
        received = [await next_event(events) for _ in texts]
    assert len(ids) == len(texts)
    assert [stream_id_key(i) for i in ids] == sorted({stream_id_key(i) for i in ids})
    expected = [
        ChatMessage(i, "alice" if n < 3 else "bob", t)
        for n, (i, t) in enumerate(zip(ids, texts, strict=True))
    ]
    assert received == expected


async def test_publish_of_nothing_returns_no_ids(broker: RedisBroker) -> None:
    """publish([]) appends nothing and returns an empty list."""
    assert await broker.publish([]) == []
    assert await broker.events_after("0-0") == []


async def test_events_after_returns_exactly_the_later_events(broker: RedisBroker) -> None:
    """events_after(id) decodes every kind and returns only what came after id, in order."""
    await register(broker, "gw1")
    join_id = await claim(broker, "Alice", "gw1", "s1")
    msg_ids = await broker.publish([encode_message("Alice", "hi"), encode_message("Alice", "yo")])
    assert await broker.release("alice", "s1")
    everything = await broker.events_after("0-0")
    assert len(everything) == 4
    leave = everything[-1]
    assert everything[:3] == [
        UserJoined(join_id, "Alice", "gw1", "s1", 1),
        ChatMessage(msg_ids[0], "Alice", "hi"),
        ChatMessage(msg_ids[1], "Alice", "yo"),
    ]
    assert isinstance(leave, UserLeft)
    assert leave == UserLeft(leave.id, "Alice", "gw1", "s1")
    assert stream_id_key(leave.id) > stream_id_key(msg_ids[1])

    assert await broker.events_after(join_id) == everything[1:]
    assert await broker.events_after(msg_ids[0]) == everything[2:]
    assert await broker.events_after(leave.id) == []


async def test_events_after_skips_undecodable_stream_entries(broker: RedisBroker) -> None:
    """A foreign entry in the room stream is skipped, not raised."""
    first = (await broker.publish([encode_message("a", "1")]))[0]
    await broker._commands.xadd(keys.ROOM_STREAM, {"d": "not json"})
    await broker._commands.xadd(keys.ROOM_STREAM, {"other": "field"})
    last = (await broker.publish([encode_message("a", "2")]))[0]
    assert await broker.events_after(first) == [ChatMessage(last, "a", "2")]


async def test_subscription_skips_undecodable_bus_messages(broker: RedisBroker) -> None:
    """A foreign message on the room channel is skipped; later events still arrive."""
    async with broker.subscribe() as events, aclosing(events):
        await broker._commands.publish(keys.ROOM_CHANNEL, "1-0 {not json")
        [event_id] = await broker.publish([encode_message("a", "after")])
        assert await next_event(events) == ChatMessage(event_id, "a", "after")


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
    await claim(broker, "Alice", "gw1", "s1", instance="A")
    await expire(broker, "gw1")
    assert await broker.heartbeat("gw1", "A", TTL) is True
    assert await broker.reap_dead_gateways() == {}
    assert [p.name for p in await broker.online()] == ["Alice"]


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
    await claim(broker, "Alice", "gw1", "s1", instance="A")
    with pytest.raises(GatewayIdInUse):
        await register(broker, "gw1", instance="B")
    [record] = await broker.gateways()
    assert (record.instance, record.users) == ("A", 1)
    assert await broker.heartbeat("gw1", "A", TTL) is True
    assert await register(broker, "gw1", instance="A") == 0  # the same instance may renew


async def test_reregistration_after_expiry_evicts_the_old_users(broker: RedisBroker) -> None:
    """Registering again after the old instance expired evicts its users, leaves announced."""
    await register(broker, "gw1", instance="A")
    await claim(broker, "Alice", "gw1", "s1", instance="A")
    await claim(broker, "Bob", "gw1", "s2", instance="A")
    await expire(broker, "gw1")
    async with broker.subscribe() as events, aclosing(events):
        assert await register(broker, "gw1", instance="B") == 2
        received = await until_marker(broker, events)
    assert all(isinstance(e, UserLeft) for e in received)
    assert sorted((e.name, e.session) for e in received) == [("Alice", "s1"), ("Bob", "s2")]
    assert await broker.online() == []
    [record] = await broker.gateways()
    assert (record.instance, record.users) == ("B", 0)


async def test_reap_announces_each_leave_once_and_spares_live_gateways(
    broker: RedisBroker,
) -> None:
    """reap_dead_gateways() evicts only expired gateways, once; a second reap does nothing."""
    await register(broker, "dead")
    await register(broker, "live")
    await claim(broker, "Alice", "dead", "s1")
    await claim(broker, "Bob", "dead", "s2")
    await claim(broker, "Carol", "live", "s3")
    await expire(broker, "dead")
    async with broker.subscribe() as events, aclosing(events):
        assert await broker.reap_dead_gateways() == {"dead": 2}
        first = await until_marker(broker, events)
        assert await broker.reap_dead_gateways() == {}
        second = await until_marker(broker, events)
    assert all(isinstance(e, UserLeft) and e.gateway == "dead" for e in first)
    assert sorted(e.name for e in first) == ["Alice", "Bob"]
    assert second == []
    assert [(p.name, p.gateway) for p in await broker.online()] == [("Carol", "live")]
    [record] = await broker.gateways()
    assert (record.id, record.users) == ("live", 1)
    assert await broker.heartbeat("live", "inst", TTL) is True
    assert (await broker.claim("alice", "Alice", "live", "inst", "s4", time.time())).accepted


async def test_reap_after_a_real_ttl_expiry(broker: RedisBroker) -> None:
    """A gateway that registered with a tiny TTL and never renewed is reaped."""
    await register(broker, "short", ttl=0.05)
    await claim(broker, "Alice", "short", "s1")
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


async def test_deregister_announces_every_leave_and_forgets_the_gateway(
    broker: RedisBroker,
) -> None:
    """deregister_gateway() announces each of its users' leaves and removes it."""
    await register(broker, "gw1")
    await register(broker, "gw2")
    await claim(broker, "Alice", "gw1", "s1")
    await claim(broker, "Bob", "gw1", "s2")
    await claim(broker, "Carol", "gw2", "s3")
    async with broker.subscribe() as events, aclosing(events):
        assert await broker.deregister_gateway("gw1", "inst") == 2
        received = await until_marker(broker, events)
    assert all(isinstance(e, UserLeft) and e.gateway == "gw1" for e in received)
    assert sorted(e.name for e in received) == ["Alice", "Bob"]
    assert [g.id for g in await broker.gateways()] == ["gw2"]
    assert [p.name for p in await broker.online()] == ["Carol"]
    assert await broker.reap_dead_gateways() == {}


async def test_deregister_by_another_instance_of_a_live_id_does_nothing(
    broker: RedisBroker,
) -> None:
    """deregister_gateway() with the wrong instance leaves the live gateway alone."""
    await register(broker, "gw1", instance="A")
    await claim(broker, "Alice", "gw1", "s1", instance="A")
    async with broker.subscribe() as events, aclosing(events):
        assert await broker.deregister_gateway("gw1", "B") == 0
        assert await until_marker(broker, events) == []
    assert [g.id for g in await broker.gateways()] == ["gw1"]
    assert [p.name for p in await broker.online()] == ["Alice"]


async def test_online_and_gateways_report_what_was_registered(broker: RedisBroker) -> None:
    """online() and gateways() report registrations, user counts, and remaining TTLs."""
    started = 1_700_000_000.5
    await broker.register_gateway("gw1", "A", "one.example:7000", started, 10)
    await broker.register_gateway("gw2", "B", "two.example:7001", started + 1, 20)
    since = 1_700_000_100.25
    await broker.claim("alice", "Alice", "gw1", "A", "s1", since)
    await broker.claim("bob", "Bob", "gw1", "A", "s2", since + 1)
    await broker.claim("carol", "Carol", "gw2", "B", "s3", since + 2)

    online = sorted(await broker.online(), key=lambda p: p.name)
    assert [(p.name, p.gateway, p.session) for p in online] == [
        ("Alice", "gw1", "s1"),
        ("Bob", "gw1", "s2"),
        ("Carol", "gw2", "s3"),
    ]
    assert [p.since for p in online] == pytest.approx([since, since + 1, since + 2], abs=1e-3)

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


# -- events --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b'7-1 {"kind": "msg", "name": "al", "text": "hi there"}',
            ChatMessage("7-1", "al", "hi there"),
        ),
        (
            '8-0 {"kind": "join", "name": "al", "gateway": "g", "session": "s", "online": 3}',
            UserJoined("8-0", "al", "g", "s", 3),
        ),
        (
            b'9-2 {"kind": "leave", "name": "al", "gateway": "g", "session": "s"}',
            UserLeft("9-2", "al", "g", "s"),
        ),
        (
            '10-0 {"kind": "msg", "name": "Zo\\u00eb", "text": "a b  c"}',
            ChatMessage("10-0", "Zoë", "a b  c"),
        ),
    ],
)
def test_decode_bus_message_decodes_each_kind(data: bytes | str, expected: RoomEvent) -> None:
    """decode_bus_message() splits the id off at the first space and decodes the JSON."""
    assert decode_bus_message(data) == expected


def test_decode_event_accepts_bytes_and_the_encoder_output() -> None:
    """decode_event() reads a bytes body, and reads back what encode_message() wrote."""
    assert decode_event("1-0", encode_message("Zoë", "ünïcode")) == ChatMessage(
        "1-0", "Zoë", "ünïcode"
    )
    body = b'{"kind": "leave", "name": "x", "gateway": "g", "session": "s"}'
    assert decode_event("2-0", body) == UserLeft("2-0", "x", "g", "s")


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "",
        "[1, 2]",
        "null",
        '"a string"',
        '{"name": "x", "text": "y"}',
        '{"kind": "msg", "name": "x"}',
        '{"kind": "join", "name": "x", "gateway": "g", "session": "s"}',
        '{"kind": "join", "name": "x", "gateway": "g", "session": "s", "online": "many"}',
        '{"kind": "leave", "name": "x", "gateway": "g"}',
        '{"kind": "kick", "name": "x"}',
    ],
)
def test_decode_event_rejects_bad_input(body: str) -> None:
    """Bad JSON, a missing field or an unknown kind raises EventDecodeError."""
    with pytest.raises(EventDecodeError):
        decode_event("1-0", body)


def test_decode_bus_message_without_a_body_raises() -> None:
    """A bus message with no JSON after the id raises EventDecodeError."""
    with pytest.raises(EventDecodeError):
        decode_bus_message(b"1-0")


def test_stream_id_key_orders_ids_numerically() -> None:
    """stream_id_key() orders by milliseconds then sequence, numerically, not as text."""
    ids = ["10-0", "9-10", "9-9", "100-0", "9-0", "10-1"]
    assert sorted(ids, key=stream_id_key) == ["9-0", "9-9", "9-10", "10-0", "10-1", "100-0"]
    assert stream_id_key("1795245487299-3") == (1795245487299, 3)
    assert stream_id_key("42") == (42, 0)


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


# -- operator actions ------------------------------------------------------------------------


async def test_kick_names_the_holder_and_emits_a_kick_event(broker: RedisBroker) -> None:
    """kick() finds the session holding a name (any case) and tells the room; no holder
    gives None and no event."""
    from broker import UserKicked

    await register(broker, "gw-a")
    await claim(broker, "Mallory", "gw-a", "s-m")
    async with broker.subscribe() as events:
        target = await broker.kick(name_key("MALLORY"), "spam")
        assert target is not None
        assert (target.name, target.session, target.gateway) == ("Mallory", "s-m", "gw-a")
        assert await broker.kick(name_key("nobody"), "x") is None
        received = await until_marker(broker, events)
    assert [(type(e), getattr(e, "reason", None)) for e in received] == [(UserKicked, "spam")]


async def test_announce_is_a_room_event(broker: RedisBroker) -> None:
    """announce() publishes an Announcement carrying the text, with a stream id."""
    from broker import Announcement

    async with broker.subscribe() as events:
        event_id = await broker.announce("maintenance at noon")
        event = await next_event(events)
    assert event == Announcement(event_id, "maintenance at noon")


async def test_touch_records_activity_for_online_users_only(broker: RedisBroker) -> None:
    """touch() stores last-message times shown by online(); names not online are ignored,
    and a release clears the record."""
    await register(broker, "gw-a")
    await claim(broker, "alice", "gw-a", "s-a")
    await broker.touch({name_key("alice"): 1_700_000_000.5, name_key("ghost"): 1.0})
    (alice,) = await broker.online()
    assert alice.active == 1_700_000_000.5
    assert await broker._commands.hexists(keys.ACTIVITY, name_key("ghost")) == 0
    await broker.release(name_key("alice"), "s-a")
    assert await broker._commands.hexists(keys.ACTIVITY, name_key("alice")) == 0


async def test_release_after_redis_lost_its_data_is_left_undecided(broker: RedisBroker) -> None:
    """Nobody holds the name and the gateway is not registered (Redis restarted empty):
    release() cannot tell whether a leave is owed and says so with None."""
    assert await broker.release("alice", "s1", "gw1") is None


async def test_force_leave_announces_a_forgotten_user_once(broker: RedisBroker) -> None:
    """force_leave() announces the leave of a user Redis forgot, but not when the name is
    held by another session again."""
    await register(broker, "gw1")
    await claim(broker, "Alice", "gw1", "s-new")
    async with broker.subscribe() as events, aclosing(events):
        assert await broker.force_leave("bob", "s-old", "Bob", "gw1") is True
        assert await broker.force_leave("alice", "s-old", "Alice", "gw1") is False
        received = await until_marker(broker, events)
    assert [(type(e), e.name) for e in received] == [(UserLeft, "Bob")]


async def test_force_leave_repeated_for_a_session_announces_once(broker: RedisBroker) -> None:
    """A retry of force_leave() (its first reply lost) announces nothing more."""
    async with broker.subscribe() as events, aclosing(events):
        assert await broker.force_leave("bob", "s-old", "Bob", "gw1") is True
        assert await broker.force_leave("bob", "s-old", "Bob", "gw1") is False
        received = await until_marker(broker, events)
    assert [(type(e), e.name) for e in received] == [(UserLeft, "Bob")]


async def test_epoch_changes_only_when_redis_loses_its_data(broker: RedisBroker) -> None:
    """epoch() is stable while Redis keeps its data, and new after it lost it."""
    first = await broker.epoch()
    assert await broker.epoch() == first
    await broker._commands.flushall()
    assert await broker.epoch() != first
