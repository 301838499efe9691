"""The bus schema (broker.events): every event kind round-trips, in Python and through Lua.

Python encodes every event; the Lua scripts only append it to a room stream and publish it
(room events) or publish it to one gateway's inbox (inbox events). Each kind is read back
here the way the gateways read it: from the subscription and, for room events, from the
stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from broker import (
    Announcement,
    ChatMessage,
    ChatRun,
    Delivery,
    EventDecodeError,
    Member,
    PrivateDelivery,
    RedisBroker,
    RoomEvent,
    Subscription,
    UserJoined,
    UserKicked,
    UserLeft,
    keys,
    stream_id_key,
)
from broker.events import (
    decode_bus_message,
    decode_event,
    decode_inbox,
    decode_member,
    encode_announcement,
    encode_join,
    encode_kick,
    encode_leave,
    encode_member,
    encode_message,
    encode_private,
)
from chatwire.names import DEFAULT_ROOM_KEY
from chatwire.texts import chat_line

#: Text that JSON and Lua could each mangle: quotes, backslashes, a slash (Lua's cjson
#: escapes it), control characters, accents, a character outside the BMP, U+2028.
AWKWARD = 'Zoë "quoted" back\\slash a/b tab\tline\nend 🙂 \u2028 ünïcode'
ROOM = "#math"


# -- in Python -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (encode_message("Alice", "hi there"), ChatMessage("5-1", "Alice", "hi there")),
        (encode_message(AWKWARD, AWKWARD), ChatMessage("5-1", AWKWARD, AWKWARD)),
        (encode_message("Alice", ""), ChatMessage("5-1", "Alice", "")),
        (encode_join("Alice", "gw1", "s1"), UserJoined("5-1", "Alice", "gw1", "s1", "")),
        (encode_join("Zoë", "gw1", "s1", "#Math"), UserJoined("5-1", "Zoë", "gw1", "s1", "#Math")),
        (encode_leave("Alice", "gw1", "s1"), UserLeft("5-1", "Alice", "gw1", "s1", "")),
        (encode_leave("Zoë", "gw2", "s2", "#Ünï"), UserLeft("5-1", "Zoë", "gw2", "s2", "#Ünï")),
        (encode_announcement("maintenance at noon"), Announcement("5-1", "maintenance at noon")),
        (encode_announcement(AWKWARD), Announcement("5-1", AWKWARD)),
    ],
)
def test_room_event_round_trips_in_python(body: str, expected: RoomEvent) -> None:
    """Each room event kind decodes, from the stream body and from the bus form, to what
    was encoded."""
    assert decode_event("5-1", body) == expected
    assert decode_event("5-1", body.encode()) == expected
    assert decode_bus_message(f"5-1 {body}") == expected
    assert decode_bus_message(f"5-1 {body}".encode()) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (encode_private("bob", "Alice", "psst"), PrivateDelivery("bob", "Alice", "psst")),
        (encode_private("zoë", AWKWARD, AWKWARD), PrivateDelivery("zoë", AWKWARD, AWKWARD)),
        (encode_kick("mallory", "spam"), UserKicked("mallory", "spam")),
        (encode_kick("mallory", ""), UserKicked("mallory", "")),
        (encode_kick("zoë", AWKWARD), UserKicked("zoë", AWKWARD)),
    ],
)
def test_inbox_event_round_trips_in_python(body: str, expected: object) -> None:
    """Each inbox event kind decodes, as text or bytes, to what was encoded."""
    assert decode_inbox(body) == expected
    assert decode_inbox(body.encode()) == expected


def test_member_record_round_trips() -> None:
    """A room member record decodes to the name and gateway encoded."""
    assert decode_member(encode_member(AWKWARD, "gw-1")) == (AWKWARD, "gw-1")
    assert decode_member(encode_member("Alice", "gw2").encode()) == ("Alice", "gw2")


def test_encoders_write_one_line_of_compact_json_with_the_kind() -> None:
    """Encoded events other than chat messages are single-line JSON objects naming their
    kind (the bus form splits the id off at the first space, and a stream entry is one
    field)."""
    for body, kind in (
        (encode_join("a", "g", "s"), "join"),
        (encode_leave("a", "g", "s"), "leave"),
        (encode_announcement("x\ny"), "notice"),
        (encode_private("k", "a", "x"), "pm"),
        (encode_kick("k", "x"), "kick"),
    ):
        assert "\n" not in body
        assert body.startswith("{") and body.endswith("}")
        assert f'"kind":"{kind}"' in body


def test_a_chat_message_travels_as_the_line_its_recipients_are_sent() -> None:
    """A chat message's body is ``m `` and the chat line itself; decoded from the bus it
    carries those very bytes, which the gateways write out without encoding them again."""
    body = encode_message("Zoë", "hi: there 🙂")
    assert body == "m Zoë: hi: there 🙂"
    event = decode_bus_message(f"7-0 {body}".encode())
    assert event == ChatMessage("7-0", "Zoë", "hi: there 🙂")
    assert isinstance(event, ChatMessage)
    assert event.line == chat_line("Zoë", "hi: there 🙂")


def test_a_chat_message_that_is_not_utf8_is_sent_as_valid_utf8() -> None:
    """Bytes on the bus that no gateway wrote (not UTF-8) never reach a client as they
    are: the line is made again from the text as decoded."""
    event = decode_bus_message(b"7-0 m Zo\xeb: caf\xe9")
    assert isinstance(event, ChatMessage)
    assert event.line == b""
    assert event == ChatMessage("7-0", "Zo\ufffd", "caf\ufffd")


def test_chat_messages_in_json_from_earlier_versions_are_still_read() -> None:
    """A stream written before messages travelled as lines (kept on disk across an
    upgrade) still gives its messages: history and replay read them as before."""
    old = '{"kind":"msg","name":"Alice","text":"hi"}'
    assert decode_event("1-0", old) == ChatMessage("1-0", "Alice", "hi")
    assert decode_bus_message(f"1-0 {old}".encode()) == ChatMessage("1-0", "Alice", "hi")


def test_decoding_tolerates_absent_optional_fields() -> None:
    """A join without room, a leave without destination and a kick without reason (older
    writers) decode with empty strings."""
    assert decode_event("1-0", '{"kind":"join","name":"a","gateway":"g","session":"s"}') == (
        UserJoined("1-0", "a", "g", "s", "")
    )
    assert decode_event("1-0", '{"kind":"leave","name":"a","gateway":"g","session":"s"}') == (
        UserLeft("1-0", "a", "g", "s", "")
    )
    assert decode_inbox('{"kind":"kick","key":"k"}') == UserKicked("k", "")


# -- decode errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "",
        "{",
        "[1, 2]",
        "null",
        "42",
        '"a string"',
        '{"name": "x", "text": "y"}',
        '{"kind": "msg", "name": "x"}',
        '{"kind": "msg", "text": "y"}',
        '{"kind": "join", "name": "x", "gateway": "g"}',
        '{"kind": "join", "gateway": "g", "session": "s"}',
        '{"kind": "leave", "name": "x", "gateway": "g"}',
        '{"kind": "leave", "name": "x", "session": "s"}',
        '{"kind": "notice"}',
        '{"kind": "pm", "key": "k", "sender": "a", "text": "t"}',
        '{"kind": "kick", "key": "k", "reason": "r"}',
        '{"kind": "message", "name": "x", "text": "y"}',
        '{"kind": null}',
        "m no separator",
        "m ",
    ],
)
def test_decode_event_rejects_malformed_bodies(body: str) -> None:
    """Bad JSON, a non-object, a missing field, an inbox kind or an unknown kind is an
    EventDecodeError for a room event."""
    with pytest.raises(EventDecodeError):
        decode_event("1-0", body)


@pytest.mark.parametrize(
    "data",
    [
        b"1-0",
        "1-0 ",
        b"not-an-id {}",
        '{"kind":"msg","name":"a","text":"b"}',
        ' {"kind":"msg","name":"a","text":"b"}',
        'x-1 {"kind":"msg","name":"a","text":"b"}',
        '1-y {"kind":"msg","name":"a","text":"b"}',
        b'1-0 {"kind":"msg","name":"a"}',
        b"1-0 \xff\xfe",
        b"1-0 m nameless",
        "m a: b",
    ],
)
def test_decode_bus_message_rejects_malformed_messages(data: bytes | str) -> None:
    """A bus message without a stream id, or without a decodable event after it, is an
    EventDecodeError."""
    with pytest.raises(EventDecodeError):
        decode_bus_message(data)


def test_a_run_decodes_to_its_ids_and_the_lines_to_send() -> None:
    """A run (ids comma-separated, then ``m `` and the lines) decodes to its ids and its
    lines, each ending in a newline, as recipients get them; message by message on
    request."""
    data = "7-0,7-1,8-0 m ana: oi\nbob: olá, ana\nana: tudo bem?".encode()
    run = decode_bus_message(data)
    assert run == ChatRun(
        ("7-0", "7-1", "8-0"), "ana: oi\nbob: olá, ana\nana: tudo bem?\n".encode()
    )
    assert run.id == "8-0"
    assert run.messages() == [
        ChatMessage("7-0", "ana", "oi"),
        ChatMessage("7-1", "bob", "olá, ana"),
        ChatMessage("8-0", "ana", "tudo bem?"),
    ]
    assert run.after((7, 0)) == ChatRun(("7-1", "8-0"), "bob: olá, ana\nana: tudo bem?\n".encode())
    assert run.after((8, 0)) is None


def test_a_run_that_is_not_utf8_is_sent_as_valid_utf8() -> None:
    """Bytes in a run that are not UTF-8 reach clients replaced, as in a single message."""
    run = decode_bus_message(b"1-0,1-1 m a: \xff\nb: ok")
    assert isinstance(run, ChatRun)
    assert run.lines == "a: \ufffd\nb: ok\n".encode()


@pytest.mark.parametrize(
    "data",
    [
        b"1-0,1-1 m a: b",  # fewer lines than ids
        b"1-0,1-1 m a: b\nc: d\ne: f",  # more
        b"1-0,1-1 m a: b\n",  # an empty line
        b"1-1,1-0 m a: b\nc: d",  # ids out of order
        b"1-0,1-0 m a: b\nc: d",
        b"1-0,x-1 m a: b\nc: d",
        b"x,1-0 m a: b\nc: d",
        b'1-0,1-1 {"kind":"msg","name":"a","text":"b"}',  # not chat lines
    ],
)
def test_decode_bus_message_rejects_malformed_runs(data: bytes) -> None:
    """A run whose ids are not stream ids in order, or whose lines are not one per id, is
    an EventDecodeError: nothing of it is delivered."""
    with pytest.raises(EventDecodeError):
        decode_bus_message(data)


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "",
        "[]",
        "null",
        '{"key": "k", "sender": "a", "text": "t"}',
        '{"kind": "pm", "key": "k", "sender": "a"}',
        '{"kind": "pm", "sender": "a", "text": "t"}',
        '{"kind": "pm", "key": "k", "text": "t"}',
        '{"kind": "kick", "reason": "r"}',
        '{"kind": "msg", "name": "a", "text": "b"}',
        '{"kind": "whisper", "key": "k"}',
    ],
)
def test_decode_inbox_rejects_malformed_bodies(body: str) -> None:
    """Bad JSON, a missing field, a room kind or an unknown kind is an EventDecodeError
    for an inbox event."""
    with pytest.raises(EventDecodeError):
        decode_inbox(body)


def test_stream_id_key_orders_ids_numerically() -> None:
    """stream_id_key() orders by milliseconds then sequence, numerically, not as text."""
    ids = ["10-0", "9-10", "9-9", "100-0", "9-0", "10-1"]
    assert sorted(ids, key=stream_id_key) == ["9-0", "9-9", "9-10", "10-0", "10-1", "100-0"]
    assert stream_id_key("1795245487299-3") == (1795245487299, 3)
    assert stream_id_key("42") == (42, 0)


# -- through Lua -----------------------------------------------------------------------------


@pytest.fixture
async def broker() -> AsyncIterator[RedisBroker]:
    b = RedisBroker.embedded()
    try:
        yield b
    finally:
        await b.close()


async def received(subscription: Subscription, count: int) -> list[Delivery]:
    """The next ``count`` deliveries of ``subscription``."""
    got: list[Delivery] = []
    async with asyncio.timeout(5):
        async for batch in subscription.batches():
            got += batch
            if len(got) >= count:
                break
    assert len(got) == count, got
    return got


async def test_every_room_event_kind_round_trips_through_the_room_scripts(
    broker: RedisBroker,
) -> None:
    """Joins (login and move), messages, notices and leaves (to the chat, to a room, and
    forced) written by the room scripts of a non-default room read back identical from the
    bus and from its stream."""
    bob_join = encode_join("Bob", "gw1", "A-2", "#Math")
    async with broker.subscription("gw1", [ROOM]) as subscription:
        entered = await broker.enter(
            ROOM, "#Math", [Member("A-1", AWKWARD, "gw1", encode_join(AWKWARD, "gw1", "A-1"))]
        )
        moved_in = await broker.enter(ROOM, "#Math", [Member("A-2", "Bob", "gw1", bob_join)])
        msg_ids = await broker.publish(
            ROOM, [encode_message(AWKWARD, AWKWARD), encode_message("Bob", "")]
        )
        assert await broker.announce(AWKWARD, ROOM) == 1
        [left_for] = await broker.leave(ROOM, [("A-2", encode_leave("Bob", "gw1", "A-2", "#Ü"))])
        assert await broker.force_leave(ROOM, "A-9", encode_leave("Ghost", "gw9", "A-9"))
        live = await received(subscription, 7)
        stored = await broker.events_after(ROOM, "0-0")
        [left] = await broker.leave(ROOM, [("A-1", encode_leave(AWKWARD, "gw1", "A-1"))])
        [last] = await received(subscription, 1)

    assert all(room == ROOM for room, _ in live)
    events = [event for _, event in live]
    notice, forced = events[4], events[6]
    assert events == [
        UserJoined(entered.join_ids[0], AWKWARD, "gw1", "A-1", ""),
        UserJoined(moved_in.join_ids[0], "Bob", "gw1", "A-2", "#Math"),
        ChatMessage(msg_ids[0], AWKWARD, AWKWARD),
        ChatMessage(msg_ids[1], "Bob", ""),
        Announcement(notice.id, AWKWARD),
        UserLeft(left_for, "Bob", "gw1", "A-2", "#Ü"),
        UserLeft(forced.id, "Ghost", "gw9", "A-9", ""),
    ]
    assert stored == events
    assert last == (ROOM, UserLeft(left, AWKWARD, "gw1", "A-1", ""))
    ids = [stream_id_key(e.id) for e in [*events, last[1]]]
    assert ids == sorted(set(ids))


async def test_room_events_read_back_from_the_stream_as_published(broker: RedisBroker) -> None:
    """events_after() returns, for each kind the room scripts append, the event the
    subscription delivered: same id, same fields."""
    async with broker.subscription("gw1", [DEFAULT_ROOM_KEY]) as subscription:
        await broker.enter(
            DEFAULT_ROOM_KEY,
            "#lobby",
            [
                Member("s1", AWKWARD, "gw1", encode_join(AWKWARD, "gw1", "s1")),
                Member("s2", "Bob", "gw1", encode_join("Bob", "gw1", "s2", "#lobby")),
            ],
        )
        await broker.publish(DEFAULT_ROOM_KEY, [encode_message(AWKWARD, AWKWARD)])
        await broker.announce(AWKWARD)
        await broker.leave(DEFAULT_ROOM_KEY, [("s2", encode_leave("Bob", "gw1", "s2", "#x"))])
        await broker.force_leave(DEFAULT_ROOM_KEY, "s3", encode_leave("Old", "gw0", "s3"))
        await broker.leave(DEFAULT_ROOM_KEY, [("s1", encode_leave(AWKWARD, "gw1", "s1"))])
        live = [event for _, event in await received(subscription, 7)]
    assert [type(e) for e in live] == [
        UserJoined,
        UserJoined,
        ChatMessage,
        Announcement,
        UserLeft,
        UserLeft,
        UserLeft,
    ]
    assert await broker.events_after(DEFAULT_ROOM_KEY, "0-0") == live
    assert await broker.events_after(DEFAULT_ROOM_KEY, live[2].id) == live[3:]


async def test_messages_published_together_travel_as_one_run(broker: RedisBroker) -> None:
    """Chat messages published in one call reach the bus as one run, whose messages are
    what the stream and the history keep, one entry each; one whose text holds a line
    break (no gateway sends one) goes message by message."""
    async with broker.subscription("gw1", [DEFAULT_ROOM_KEY]) as subscription:
        ids = await broker.publish(
            DEFAULT_ROOM_KEY, [encode_message("ana", f"oi {n}, olá") for n in range(3)]
        )
        split = await broker.publish(
            DEFAULT_ROOM_KEY, [encode_message("bob", "a\nb"), encode_message("bob", "c")]
        )
        live = [event for _, event in await received(subscription, 3)]
    run, *single = live
    assert isinstance(run, ChatRun) and list(run.ids) == ids
    assert run.lines == b"".join(f"ana: oi {n}, ol\u00e1\n".encode() for n in range(3))
    stored = await broker.events_after(DEFAULT_ROOM_KEY, "0-0")
    assert run.messages() == stored[:3]
    assert (
        single
        == stored[3:]
        == [
            ChatMessage(split[0], "bob", "a\nb"),
            ChatMessage(split[1], "bob", "c"),
        ]
    )
    history = await broker.history(DEFAULT_ROOM_KEY, 10)
    assert [m.text for m in history] == ["oi 0, olá", "oi 1, olá", "oi 2, olá", "a\nb", "c"]


async def test_inbox_event_kinds_round_trip_through_send_to_holder(broker: RedisBroker) -> None:
    """A private message and a kick reach the holder's inbox as the events encoded."""
    await broker.register_gateway("gw1", "A", "gw1:1", time.time(), 30)
    await broker.claim("zoë", AWKWARD, "gw1", "A", "A-1", time.time())
    async with broker.subscription("gw1", []) as subscription:
        assert await broker.send_private("zoë", AWKWARD, AWKWARD) == AWKWARD
        kicked = await broker.kick("zoë", AWKWARD)
        assert kicked is not None
        assert await broker.kick("zoë", "") is not None
        live = await received(subscription, 3)
    assert live == [
        (None, PrivateDelivery("zoë", AWKWARD, AWKWARD)),
        (None, UserKicked("zoë", AWKWARD)),
        (None, UserKicked("zoë", "")),
    ]


async def test_malformed_bus_and_stream_entries_are_skipped(broker: RedisBroker) -> None:
    """A foreign message on a room channel or inbox, or a foreign stream entry, is skipped;
    the events around it still arrive."""
    room = keys.room(DEFAULT_ROOM_KEY)
    async with broker.subscription("gw1", [DEFAULT_ROOM_KEY]) as subscription:
        [first] = await broker.publish(DEFAULT_ROOM_KEY, [encode_message("a", "1")])
        await broker._commands.publish(room.channel, "1-0 {not json")
        await broker._commands.publish(room.channel, "no id at all")
        await broker._commands.publish(keys.gateway_inbox("gw1"), '{"kind":"pm"}')
        await broker._commands.xadd(room.stream, {"d": "not json"})
        await broker._commands.xadd(room.stream, {"other": "field"})
        [last] = await broker.publish(DEFAULT_ROOM_KEY, [encode_message("a", "2")])
        live = await received(subscription, 2)
    assert live == [
        (DEFAULT_ROOM_KEY, ChatMessage(first, "a", "1")),
        (DEFAULT_ROOM_KEY, ChatMessage(last, "a", "2")),
    ]
    assert await broker.events_after(DEFAULT_ROOM_KEY, "0-0") == [e for _, e in live]
