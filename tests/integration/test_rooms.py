"""Rooms and private messages (PROTOCOL.md, "Rooms" and "Private messages"), on real Redis
and three real gateways, users spread over them so that every relay crosses Redis.

Every test runs twice: on one Redis server, and on a Redis Cluster of three primaries with
each gateway pointed at another node."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.conftest import Cluster
from tests.support import ChatClient, GatewayProcess, RedisServer, T, TcpProxy, run_cli
from tests.topologies import ClusterFixture

pytestmark = pytest.mark.integration


async def sync_on(sender: ChatClient, *readers: ChatClient) -> list[list[str]]:
    """Send a marker message and read every reader (all in the sender's room) up to it:
    a room's events are totally ordered, so whatever came before has been read."""
    marker = f"marker-{time.monotonic_ns()}"
    await sender.send(marker)
    want = f"{sender.name}: {marker}"
    return [await r.expect(want) for r in readers]


async def join(client: ChatClient, room: str) -> list[str]:
    """Move ``client`` to ``room`` and read up to the notice that says it is there."""
    await client.send(f"/join {room}")
    return await client.expect(lambda line: line.startswith("* You are in #"))


@pytest.fixture(params=["one Redis", "Redis Cluster"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    redis: RedisServer | ClusterFixture = (
        RedisServer() if request.param == "one Redis" else ClusterFixture(primaries=3)
    )
    await redis.start()
    c = Cluster(redis)
    yield c
    await c.close()
    await redis.close()


@pytest.fixture
async def redis_client(cluster: Cluster) -> AsyncIterator[aioredis.Redis | RedisCluster]:
    client: aioredis.Redis | RedisCluster
    if isinstance(cluster.redis, ClusterFixture):
        client = RedisCluster.from_url(cluster.redis.url)
        await client.initialize()
    else:
        client = aioredis.Redis.from_url(cluster.redis.url)
    yield client
    await client.aclose()


async def room_keys(redis_client: aioredis.Redis | RedisCluster) -> set[str]:
    return {k.decode() async for k in redis_client.scan_iter("chat:room:*")}


@pytest.fixture
async def one_redis(redis_server: RedisServer) -> AsyncIterator[Cluster]:
    c = Cluster(redis_server)
    yield c
    await c.close()


async def who_names(cluster: Cluster) -> list[str]:
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", cluster.redis.url, "who", "--json"
    )
    assert status == 0, err
    return [user["name"] for user in json.loads(out)]


class BusWatch:
    """What the bus carries on ``channels``: classic pub/sub on one Redis, sharded pub/sub
    on a cluster (where each room's channel is on its own node)."""

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self._sharded = isinstance(client, RedisCluster)
        self._pubsub = client.pubsub()

    async def watch(self, *channels: str) -> None:
        if self._sharded:
            await self._pubsub.ssubscribe(*channels)
        else:
            await self._pubsub.subscribe(*channels)

    async def messages(self, idle: float = 0.2) -> list[tuple[str, bytes]]:
        """(channel, data) of every message received until none came for ``idle`` s."""
        found = []
        while True:
            if self._sharded:
                message = await self._pubsub.get_sharded_message(timeout=idle)
            else:
                message = await self._pubsub.get_message(timeout=idle)
            if message is None:
                return found
            if message["type"] in ("message", "smessage"):
                found.append((message["channel"].decode(), message["data"]))

    async def close(self) -> None:
        await self._pubsub.aclose()


# 1, 2, 3. The default room; moves announced once in each room, on every gateway.
async def test_a_move_is_announced_once_in_both_rooms_on_every_gateway(cluster: Cluster) -> None:
    """The room left sees `left for`, the room entered `joined`, each once; the mover gets
    the room and its size, that room's history, then its live traffic."""
    await cluster.start(3)
    dan = await cluster.user(0, "dan")
    await join(dan, "#Math")
    await dan.send("theorem 1")
    await dan.expect("dan: theorem 1")
    bob = await cluster.user(1, "bob")
    carol = await cluster.user(2, "carol")
    ana = await cluster.user(0, "ana")
    await bob.expect("* carol joined the chat")
    await bob.expect("* ana joined the chat")
    await carol.expect("* ana joined the chat")
    await bob.send("lobby talk")
    for user in (ana, bob, carol):
        await user.expect("bob: lobby talk")

    lines = await join(ana, "#MATH")  # another case: the same room, shown as first created
    assert lines == ["* You are in #Math now: 2 users here."]
    history = await ana.readline()
    assert history.startswith("* [history ") and history.endswith(" UTC] dan: theorem 1")
    assert await dan.readline() == "* ana joined #Math"
    for lobby_user in (bob, carol):
        assert await lobby_user.readline() == "* ana left for #Math"
    # Exactly once, and nothing of either room leaks into the other.
    seen = await sync_on(dan, dan, ana)
    assert seen == [[f"dan: {seen[0][0].split(': ', 1)[1]}"]] * 2
    seen = await sync_on(bob, bob, carol)
    assert all(len(lines) == 1 for lines in seen)


async def test_join_of_the_current_room_or_an_invalid_name_changes_nothing(
    cluster: Cluster, redis_client: aioredis.Redis
) -> None:
    """`/join` of the room one is in (in any case or width) gets a `* ` line; an invalid
    name a `! ` line; nobody else sees anything, and no room appears in Redis."""
    await cluster.start(2)
    ana = await cluster.user(0, "ana")
    bob = await cluster.user(1, "bob")
    await ana.expect("* bob joined the chat")
    await join(ana, "#math")
    await bob.expect("* ana left for #math")
    await join(bob, "#math")
    await ana.expect("* bob joined #math")
    for same in ("#math", "#MATH", "#\uff4d\uff41\uff54\uff48"):
        await ana.send(f"/join {same}")
        assert await ana.readline() == "* You are already in #math."
    for bad in ("math", "#", "#two words", "#" + "x" * 33, "#a*b"):
        await ana.send(f"/join {bad}")
        assert (await ana.readline()).startswith("! invalid room name: ")
    await ana.send("/join")
    assert await ana.readline() == "! usage: /join #ROOM"
    seen = await sync_on(ana, ana, bob)
    assert [len(lines) for lines in seen] == [1, 1]
    keys = await room_keys(redis_client)
    assert {k.split("{")[1].split("}")[0] for k in keys} <= {"#lobby", "#math"}


async def test_part_and_join_of_the_default_room_go_back_to_the_lobby(cluster: Cluster) -> None:
    """/part returns to #lobby (announced there as a join), as does /join #lobby."""
    await cluster.start(2)
    ana = await cluster.user(0, "ana")
    bob = await cluster.user(1, "bob")
    await ana.expect("* bob joined the chat")
    await join(ana, "#x")
    await bob.expect("* ana left for #x")
    await ana.send("/part")
    await ana.expect(lambda line: line.startswith("* You are in #lobby now: 2 users here."))
    assert await bob.readline() == "* ana joined #lobby"
    await join(ana, "#y")
    await bob.expect("* ana left for #y")
    await join(ana, "#LOBBY")
    assert await bob.readline() == "* ana joined #lobby"


# 4. Messages reach exactly the room; one order per room; senders' order kept.
async def test_rooms_are_isolated_across_gateways(cluster: Cluster) -> None:
    """A message reaches every member of its room on every gateway, sender included, and
    nobody outside it."""
    await cluster.start(3)
    a = [await cluster.user(i, f"a{i}") for i in range(3)]
    b = [await cluster.user(i, f"b{i}") for i in range(3)]
    for user in a:
        await join(user, "#alpha")
    for user in b:
        await join(user, "#beta")
    await a[1].send("only alpha")
    await b[2].send("only beta")
    for user in a:
        await user.expect("a1: only alpha")
    for user in b:
        await user.expect("b2: only beta")
    for sender, room in ((a[0], a), (b[0], b)):
        for lines in await sync_on(sender, *room):
            assert not any("only alpha" in x or "only beta" in x for x in lines), lines


async def test_each_room_has_one_order_with_concurrent_senders(cluster: Cluster) -> None:
    """Two rooms, two senders each on different gateways, sending at once: every member of
    a room sees the same sequence, each sender's lines in order, no line of the other room."""
    await cluster.start(3, "--rate-limit", "0")
    rooms: dict[str, list[ChatClient]] = {"#r1": [], "#r2": []}
    for n in range(6):
        user = await cluster.user(n % 3, f"u{n}")
        room = "#r1" if n % 2 else "#r2"
        await join(user, room)
        rooms[room].append(user)
    for members in rooms.values():
        await sync_on(members[0], *members)  # past every join notice
    count = 60

    async def send_all(user: ChatClient) -> None:
        for i in range(count):
            await user.send(f"{user.name} line {i}")

    senders = [m for members in rooms.values() for m in members[:2]]
    await asyncio.gather(*(send_all(s) for s in senders))
    for room, members in rooms.items():
        own = {m.name for m in members[:2]}
        sequences = []
        for member in members:
            lines = []
            while len(lines) < 2 * count:
                line = await member.readline()
                assert line.split(":")[0] in own, (room, line)
                lines.append(line)
            sequences.append(lines)
        assert all(seq == sequences[0] for seq in sequences), room
        for name in own:
            mine = [x for x in sequences[0] if x.startswith(f"{name}:")]
            assert mine == [f"{name}: {name} line {i}" for i in range(count)]


async def test_history_is_per_room(cluster: Cluster) -> None:
    """A room's history on entering and with /history is its own, never another room's."""
    await cluster.start(2)
    ana = await cluster.user(0, "ana")
    await ana.send("in the lobby")
    await ana.expect("ana: in the lobby")
    await join(ana, "#x")
    await ana.send("in x")
    await ana.expect("ana: in x")
    bob = await cluster.user(1, "bob")
    assert _history_texts(await _read_history(bob)) == ["ana: in the lobby"]
    lines = await join(bob, "#X")
    assert lines[-1] == "* You are in #x now: 2 users here."
    assert _history_texts(await _read_history(bob)) == ["ana: in x"]
    await bob.send("/history 5")
    assert _history_texts(await _read_history(bob)) == ["ana: in x"]
    await ana.send("/part")
    await ana.expect(lambda line: line.startswith("* You are in #lobby now"))
    assert _history_texts(await _read_history(ana)) == ["ana: in the lobby"]


async def _read_history(client: ChatClient) -> list[str]:
    """History lines up to the marker that follows them (sent by the client itself)."""
    lines = await sync_on(client, client)
    return [x for x in lines[0] if x.startswith("* [history ")]


def _history_texts(lines: list[str]) -> list[str]:
    texts = [x.split("UTC] ", 1)[1] for x in lines]
    return [t for t in texts if ": marker-" not in t]  # sync_on's own markers


# 5. Leaving the chat: announced in the current room only, exactly once.
@pytest.mark.parametrize("how", ["sair", "eof", "reset", "kick"])
async def test_leaving_is_announced_in_the_current_room_only(cluster: Cluster, how: str) -> None:
    """However a user leaves, its current room (on every gateway) sees `left the chat`
    once; the room it left before sees nothing more."""
    await cluster.start(3)
    ana = await cluster.user(0, "ana")
    bob = await cluster.user(1, "bob")
    carol = await cluster.user(2, "carol")
    await join(bob, "#math")
    await join(ana, "#math")
    await bob.expect("* ana joined #math")
    await carol.expect("* ana left for #math")
    if how == "sair":
        await ana.send("sair")
    elif how == "eof":
        ana.writer.write_eof()
    elif how == "reset":
        ana.reset()
    else:
        status, _, err = await run_cli(
            "chat-admin", "--redis-url", cluster.redis.url, "kick", "ana", "--reason", "test"
        )
        assert status == 0, err
    assert await bob.readline() == "* ana left the chat"
    seen = await sync_on(bob, bob)
    assert len(seen[0]) == 1
    seen = await sync_on(carol, carol)
    assert len(seen[0]) == 1, seen  # nothing about ana in the lobby


async def test_a_killed_gateways_users_leave_their_own_rooms_once(cluster: Cluster) -> None:
    """A SIGKILLed gateway's users are announced as left by the survivors, each in the room
    it was in, once."""
    gateways = await cluster.start(3)
    ana = await cluster.user(0, "ana")
    zoe = await cluster.user(0, "zoe")
    bob = await cluster.user(1, "bob")
    carol = await cluster.user(2, "carol")
    await join(ana, "#math")
    await join(bob, "#math")
    await carol.expect("* bob left for #math")
    gateways[0].signal(signal.SIGKILL)
    assert await bob.readline(timeout=4 * T) == "* ana left the chat"
    assert await carol.readline(timeout=4 * T) == "* zoe left the chat"
    for user in (bob, carol):
        seen = await sync_on(user, user)
        assert len(seen[0]) == 1, seen
    del zoe


# 6. /who and /rooms; chat-admin agrees.
async def test_who_lists_the_room_and_rooms_lists_every_room(cluster: Cluster) -> None:
    """/who lists the current room's members; /rooms every room with members and its
    size; `chat-admin rooms --json` and `who --json` say the same."""
    await cluster.start(3)
    users = [await cluster.user(i % 3, name) for i, name in enumerate(["ana", "bob", "cy", "di"])]
    await users[0].send("/who")
    assert (await users[0].expect("*   di"))[-5:] == [
        "* 4 users online:", "*   ana", "*   bob", "*   cy", "*   di",
    ]  # fmt: skip
    await join(users[1], "#Math")
    await join(users[2], "#math")
    await users[1].send("/who")
    assert (await users[1].expect("*   cy"))[-3:] == ["* 2 users in #Math:", "*   bob", "*   cy"]
    await users[0].send("/who")
    assert (await users[0].expect("*   di"))[-3:] == ["* 2 users in #lobby:", "*   ana", "*   di"]
    await users[3].send("/rooms")
    assert (await users[3].expect("*   #Math: 2 users"))[-3:] == [
        "* 2 rooms:", "*   #lobby: 2 users", "*   #Math: 2 users",
    ]  # fmt: skip
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", cluster.redis.url, "rooms", "--json"
    )
    assert status == 0, err
    assert json.loads(out) == [{"room": "#lobby", "users": 2}, {"room": "#Math", "users": 2}]
    status, out, err = await run_cli(
        "chat-admin", "--redis-url", cluster.redis.url, "who", "--json"
    )
    assert status == 0, err
    assert {u["name"]: u["room"] for u in json.loads(out)} == {
        "ana": "#lobby", "bob": "#Math", "cy": "#Math", "di": "#lobby",
    }  # fmt: skip


async def test_in_the_lobby_with_no_rooms_in_use_who_is_as_before(cluster: Cluster) -> None:
    """With everyone in #lobby, /who answers exactly as before rooms existed."""
    await cluster.start(2)
    ana = await cluster.user(0, "ana")
    await cluster.user(1, "bob")
    await ana.send("/who")
    assert await ana.expect("*   bob") == ["* bob joined the chat", "* 2 users online:",
                                          "*   ana", "*   bob"]  # fmt: skip


# 7. Private messages.
async def test_a_private_message_reaches_its_recipient_alone(
    cluster: Cluster, redis_client: aioredis.Redis | RedisCluster
) -> None:
    """`/msg` across gateways and rooms: the recipient gets `(private)`, the sender the
    echo; nobody else sees it, no room's stream holds it, and only the recipient's
    gateway's inbox carries it."""
    await cluster.start(3)
    bus = BusWatch(redis_client)
    await bus.watch(
        *(f"{{chat}}:gw:gw-{n}:inbox" for n in (1, 2, 3)),
        *(f"chat:room:{{{room}}}:bus" for room in ("#lobby", "#math")),
    )
    ana = await cluster.user(0, "ana")
    bob = await cluster.user(1, "Bob")
    carol = await cluster.user(2, "carol")
    await join(ana, "#math")
    await carol.expect("* ana left for #math")
    await ana.send("/msg BOB psst, only you")
    assert await ana.readline() == "(private to Bob) ana: psst, only you"
    assert await bob.expect(lambda x: x.startswith("(private)")) == [
        "* carol joined the chat", "* ana left for #math", "(private) ana: psst, only you",
    ]  # fmt: skip
    for user in (ana, carol):
        seen = await sync_on(user, user)
        assert not any("psst" in x for x in seen[0]), seen
    for room in ("#lobby", "#math"):
        entries = await redis_client.xrange(f"chat:room:{{{room}}}:log")
        assert not any(b"psst" in fields[b"d"] for _, fields in entries)
    await ana.send("/history 100")
    assert not any("psst" in x for x in (await sync_on(ana, ana))[0])
    messages = await bus.messages()
    await bus.close()
    assert any(b'"kind":"leave"' in data for _, data in messages)  # the watch works
    assert {channel for channel, data in messages if b"psst" in data} == {"{chat}:gw:gw-2:inbox"}


async def test_private_message_errors(cluster: Cluster) -> None:
    """An unknown or offline name, or no text, gets a `! ` line and nothing is delivered."""
    await cluster.start(2)
    ana = await cluster.user(0, "ana")
    bob = await cluster.user(1, "bob")
    await ana.expect("* bob joined the chat")
    await ana.send("/msg zed hello")
    assert await ana.readline() == "! no user named zed is online"
    for line in ("/msg bob", "/msg bob    ", "/msg"):
        await ana.send(line)
        assert await ana.readline() == "! usage: /msg NAME TEXT"
    await ana.send("/msg no*such hi")
    assert await ana.readline() == "! no user named no*such is online"
    seen = await sync_on(bob, bob)
    assert len(seen[0]) == 1, seen


# Bad input leaves nothing behind.
async def test_a_storm_of_joins_leaves_no_stray_keys(
    cluster: Cluster, redis_client: aioredis.Redis | RedisCluster
) -> None:
    """Hundreds of /join to new rooms in a row (flood control off), then 10,000 more with
    the default limits (paced, then cut short by a hang-up): every answer is a clear line,
    and once the users are back in the lobby or gone no room but #lobby has a key."""
    await cluster.start(1, "--rate-limit", "0")
    ana = await cluster.user(0, "ana")
    await ana.send("".join(f"/join #r{i}\n" for i in range(300)).encode())
    await ana.expect("* You are in #r299 now: 1 user here.", timeout=6 * T)
    await ana.send("/part")
    await ana.expect(lambda line: line.startswith("* You are in #lobby now"))
    keys = await room_keys(redis_client)
    assert all("{#lobby}" in k for k in keys), keys

    await cluster.start(1)  # a second gateway, with the default flood control
    bob = await cluster.user(1, "bob")
    await bob.send("".join(f"/join #s{i}\n" for i in range(10_000)).encode())
    # Paced at 10 a second after a burst of 20: watch 25 moves, then hang up mid-storm.
    answers = await bob.expect("* You are in #s24 now: 1 user here.", timeout=2 * T)
    assert all(a.startswith("* ") for a in answers), answers
    assert (
        answers.count(
            "* Slow down: at most 10 lines a second; your next lines follow at that pace."
        )
        == 1
    )
    bob.reset()
    # The leave of bob's last room and that room's deletion are one step in Redis; the
    # moves before it may still be on their way: once bob's name is free, he is gone.
    async with asyncio.timeout(2 * T):
        while "bob" in await who_names(cluster):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    keys = await room_keys(redis_client)
    assert all("{#lobby}" in k for k in keys), keys
    status, out, _ = await run_cli(
        "chat-admin", "--redis-url", cluster.redis.url, "rooms", "--json"
    )
    assert status == 0
    assert json.loads(out) == [{"room": "#lobby", "users": 1}]


async def test_a_cut_link_is_replayed_room_by_room(one_redis: Cluster) -> None:
    """A gateway's link to Redis is cut while two rooms are busy elsewhere: when it
    returns, each of its users gets exactly its own room's messages, in order, once.
    (One Redis only: a proxy cannot stand in front of a cluster, whose nodes tell clients
    their own addresses. On a cluster, test_cluster.py cuts links by killing nodes.)"""
    cluster = one_redis
    await cluster.start(1, "--rate-limit", "0")
    proxy = TcpProxy(cluster.redis.port)
    await proxy.start()
    cut_gateway = GatewayProcess("gw-cut", proxy.url)
    cluster.gateways.append(cut_gateway)
    try:
        await cut_gateway.start()
        senders = {room: await cluster.user(0, f"s{room[1:]}") for room in ("#a", "#b")}
        receivers = {room: await cluster.user(1, f"r{room[1:]}") for room in ("#a", "#b")}
        for room in ("#a", "#b"):
            await join(senders[room], room)
            await join(receivers[room], room)
            await senders[room].expect(f"* r{room[1:]} joined {room}")
        await proxy.cut()
        for room, sender in senders.items():
            await sender.send("".join(f"{room} {n:03d}\n" for n in range(100)).encode())
        for room, sender in senders.items():
            await sender.expect(f"{sender.name}: {room} 099")  # all in Redis now
        await proxy.start()
        for room, receiver in receivers.items():
            lines = await receiver.expect(f"s{room[1:]}: {room} 099", timeout=6 * T)
            chat = [line for line in lines if not line.startswith("* ")]
            assert chat == [f"s{room[1:]}: {room} {n:03d}" for n in range(100)]
            seen = await sync_on(senders[room], receiver)
            assert len(seen[0]) == 1, seen
        assert cut_gateway.log is not None
        assert sum("replaying" in line for line in cut_gateway.log.lines) == 2
    finally:
        await proxy.close()


async def test_announcements_reach_every_room_or_the_one_named(cluster: Cluster) -> None:
    """`chat-admin announce` reaches every room once; with --room, that room only; an
    invalid or empty room is a clear failure."""
    await cluster.start(2)
    ana = await cluster.user(0, "ana")
    bob = await cluster.user(1, "bob")
    await join(ana, "#math")
    await bob.expect("* ana left for #math")
    url = cluster.redis.url
    status, _, err = await run_cli("chat-admin", "--redis-url", url, "announce", "to", "all")
    assert status == 0, err
    assert await ana.readline() == "* [admin] to all"
    assert await bob.readline() == "* [admin] to all"
    status, _, err = await run_cli(
        "chat-admin", "--redis-url", url, "announce", "--room", "#MATH", "quiz time"
    )
    assert status == 0, err
    assert await ana.readline() == "* [admin] quiz time"
    seen = await sync_on(bob, bob)
    assert len(seen[0]) == 1, seen
    for room, message in (("math", "invalid room name"), ("#empty", "nobody is in #empty")):
        status, out, err = await run_cli(
            "chat-admin", "--redis-url", url, "announce", "--room", room, "x"
        )
        assert status == 1 and out == "" and message in err and len(err.splitlines()) == 1
