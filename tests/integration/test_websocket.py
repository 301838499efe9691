"""The line protocol over WebSocket (PROTOCOL.md, "WebSocket"), on real Redis and real
gateways with their web port on, against a Python WebSocket client.

Every numbered point of PROTOCOL.md that a WebSocket client can meet, with WebSocket and
TCP users on different gateways, then the framing rules: binary, oversized, fragmented and
multi-line frames.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time

import pytest
from websockets.frames import CloseCode

from chatwire.commands import HELP
from chatwire.lines import MAX_LINE_BYTES
from chatwire.texts import (
    FRAME_LINE_BREAK_TEXT,
    LINE_TOO_LONG_TEXT,
    NOT_DELIVERED_TEXT,
    SERVICE_BACK_TEXT,
    SERVICE_DOWN_TEXT,
    UNAVAILABLE_TEXT,
)
from gateway.web.transport import MAX_MESSAGE_BYTES
from tests.conftest import Cluster
from tests.support import T, flood_past, run_cli

pytestmark = pytest.mark.integration

WEB = ("--web-port", "0")
SLOW_DOWN = "* Slow down: at most 10 lines a second; your next lines follow at that pace."
RESTART_NOTICE = "* Server restarting: please reconnect."
DOWN, BACK = f"* {SERVICE_DOWN_TEXT}", f"* {SERVICE_BACK_TEXT}"


async def admin(cluster: Cluster, *args: str) -> str:
    status, out, err = await run_cli("chat-admin", "--redis-url", cluster.redis.url, *args)
    assert status == 0, err
    return out


# 1, 2. Prompt, then a name: refused with the reason and a new prompt, or welcomed.
async def test_prompt_and_name_rules(cluster: Cluster) -> None:
    """The prompt comes first; an invalid name and a name taken on another gateway (over
    TCP, compared folded) are refused with their reason and a new prompt; a good one is
    welcomed with the count, then the room's history marked as history; a line sent
    while the name is checked is handled after the welcome."""
    await cluster.start(2, *WEB)
    alice = await cluster.user(1, "alice")
    await alice.send("before you came")
    await alice.expect("alice: before you came")
    client = await cluster.web(0)
    assert await client.readline() == "* Choose a name:"
    await client.send("no spaces")
    refusal = await client.readline()
    assert refusal.startswith("! invalid name: "), refusal
    assert await client.readline() == "* Choose a name:"
    await client.send("ALICE")
    assert await client.readline() == "! the name ALICE is taken; choose another"
    assert await client.readline() == "* Choose a name:"
    await client.send("ana")
    await client.send("said at once")  # sent before the claim is decided
    welcome = await client.readline()
    assert welcome.startswith("* Welcome, ana! 2 users online. Type /help"), welcome
    history = await client.readline()
    assert re.fullmatch(
        r"\* \[history \d{4}-\d\d-\d\d \d\d:\d\d UTC\] alice: before you came", history
    )
    assert await client.readline() == "ana: said at once"
    assert await alice.expect("ana: said at once") == ["* ana joined the chat", "ana: said at once"]


# 3, 4. Joins and messages cross gateways and transports, in order.
async def test_websocket_and_tcp_users_chat_across_gateways(cluster: Cluster) -> None:
    """A WebSocket user on one gateway and TCP users on another see each other's joins and
    messages, the sender's own echo included, each sender's lines in order; `//` sends a
    line starting with `/`; text is never a command or a system line."""
    await cluster.start(2, *WEB)
    ana = await cluster.web_user(0, "ana")
    bob = await cluster.user(1, "bob")
    assert await ana.readline() == "* bob joined the chat"
    for n in range(5):
        await ana.send(f"web {n}")
    await ana.send("//shrug")
    await ana.send("* not a notice")
    expected = [*(f"ana: web {n}" for n in range(5)), "ana: /shrug", "ana: * not a notice"]
    assert [await bob.readline() for _ in expected] == expected
    assert [await ana.readline() for _ in expected] == expected
    await bob.send("from nc")
    assert await ana.readline() == "bob: from nc"


# 5. Leaving.
@pytest.mark.parametrize("word", ["sair", "/QUIT"])
async def test_leaving_says_goodbye_closes_with_1000_and_is_announced_once(
    cluster: Cluster, word: str
) -> None:
    """`sair` or `/quit`: goodbye, a normal close, and the room sees one leave."""
    await cluster.start(2, *WEB)
    bob = await cluster.user(1, "bob")
    ana = await cluster.web_user(0, "ana")
    await bob.expect("* ana joined the chat")
    await ana.send(word)
    assert await ana.readline() == "* Goodbye, ana!"
    assert await ana.closed() == (CloseCode.NORMAL_CLOSURE, "")
    assert await bob.readline() == "* ana left the chat"
    await bob.send("anyone?")
    assert await bob.readline() == "bob: anyone?"  # and no second leave before it


# 6. Vanishing.
async def test_a_dropped_websocket_is_announced_as_left_at_once(cluster: Cluster) -> None:
    """A browser tab closed (the TCP connection dropped, no close frame) is announced
    within 2 seconds, and its name is free again."""
    await cluster.start(2, *WEB)
    bob = await cluster.user(1, "bob")
    ana = await cluster.web_user(0, "ana")
    await bob.expect("* ana joined the chat")
    started = time.monotonic()
    ana.ws.transport.abort()
    assert await bob.readline(timeout=2) == "* ana left the chat"
    assert time.monotonic() - started < 2
    await cluster.name_free("ana")
    await cluster.web_user(1, "ana")


# 7. Gateway failure.
async def test_a_killed_gateways_websocket_users_are_announced_by_the_others(
    cluster: Cluster,
) -> None:
    """SIGKILL of the gateway holding a WebSocket user: the others announce the leave."""
    await cluster.start(2, *WEB)
    bob = await cluster.user(1, "bob")
    await cluster.web_user(0, "ana")
    await bob.expect("* ana joined the chat")
    cluster.gateways[0].signal(signal.SIGKILL)
    assert await bob.readline(timeout=15) == "* ana left the chat"


# 8, 9, 10. Commands, and errors that keep the connection.
async def test_commands_and_errors_over_websocket(cluster: Cluster) -> None:
    """/who, /history, /help, an unknown command and a bad /msg answer as on TCP, each
    `* ` or `! ` line a frame of its own, and no error closes the connection."""
    await cluster.start(2, *WEB)
    bob = await cluster.user(1, "bob")
    ana = await cluster.web_user(0, "ana")
    await bob.send("first")
    assert await ana.expect("bob: first")
    await ana.send("/who")
    assert [await ana.readline() for _ in range(3)] == ["* 2 users online:", "*   ana", "*   bob"]
    await ana.send("/history 1")
    assert re.fullmatch(r"\* \[history [^\]]+\] bob: first", await ana.readline())
    await ana.send("/help")
    assert [await ana.readline() for _ in HELP] == [f"* {text}" for text in HELP]
    await ana.send("/frobnicate")
    assert await ana.readline() == "! unknown command /frobnicate; type /help for the list"
    await ana.send("/msg nobody hi")
    assert await ana.readline() == "! no user named nobody is online"
    await ana.send("still here")
    assert await ana.readline() == "ana: still here"


# 11. Slow readers.
async def test_a_websocket_that_stops_reading_is_cut_without_delaying_others(
    cluster: Cluster,
) -> None:
    """A WebSocket client that stops reading is disconnected once its queue passes 1 MiB
    (leave announced), while the others receive everything, in order."""
    await cluster.start(2, "--rate-limit", "0", *WEB)
    watcher = await cluster.user(0, "watcher")
    flooder = await cluster.user(1, "flooder")
    # It reads nothing: one frame fills its client's queue, then the socket stops.
    stalled = await cluster.web(0, rcvbuf=4096, max_queue=1)
    await stalled.login("stalled")
    await flood_past("stalled", watcher, flooder)
    assert cluster.gateways[0].log is not None
    assert any("stopped reading" in line for line in cluster.gateways[0].log.lines)
    code, _ = await stalled.closed(2 * T)
    assert code == CloseCode.ABNORMAL_CLOSURE  # cut, not closed: nothing more could be sent


# 12. Flooding.
async def test_a_burst_of_frames_is_paced_not_dropped(cluster: Cluster) -> None:
    """40 frames at once: 20 go at once, the sender is told once to slow down, the rest
    follow at 10 a second, in order, none dropped."""
    await cluster.start(2, *WEB)
    watcher = await cluster.user(0, "watcher")
    flooder = await cluster.web_user(1, "flooder")
    await watcher.expect("* flooder joined the chat")
    started = time.monotonic()
    for n in range(40):
        await flooder.send(f"line {n}")
    lines = await watcher.expect("flooder: line 39", timeout=4 * T)
    assert lines == [f"flooder: line {n}" for n in range(40)]
    assert time.monotonic() - started > 1.5  # 20 past the burst, at 10 a second
    seen = await flooder.expect("flooder: line 39", timeout=T)
    assert seen.count(SLOW_DOWN) == 1
    assert [x for x in seen if x != SLOW_DOWN] == [f"flooder: line {n}" for n in range(40)]


# 13. Connection limits count WebSocket and TCP connections together.
async def test_connection_limits_count_websockets(cluster: Cluster) -> None:
    """--max-per-address: a TCP and a WebSocket connection from one address fill two
    places; a third WebSocket is refused with the `! ` line and a close; once one leaves
    there is room again."""
    await cluster.start(1, "--max-per-address", "2", *WEB)
    bob = await cluster.user(0, "bob")
    ana = await cluster.web_user(0, "ana")
    refused = await cluster.web(0)
    assert await refused.readline() == "! too many connections from your address"
    assert (await refused.closed())[0] == CloseCode.NORMAL_CLOSURE
    await ana.send("sair")
    await bob.expect("* ana left the chat")  # announced once its place was given back
    again = await cluster.web(0)
    assert await again.readline() == "* Choose a name:"


# 14. Message service down.
async def test_message_service_down_and_back_over_websocket(cluster: Cluster) -> None:
    """Redis goes away: the WebSocket user stays connected and is told; its line is
    refused with `! not delivered`; a name is refused with the reason and a new prompt;
    when Redis is back the user is told, and the name is accepted."""
    await cluster.start(1, *WEB)
    ana = await cluster.web_user(0, "ana")
    await cluster.redis.stop()
    assert await ana.readline(3 * T) == DOWN
    await ana.send("anyone there?")
    assert await ana.readline(3 * T) == f"! {NOT_DELIVERED_TEXT}"
    newcomer = await cluster.web(0)
    assert await newcomer.readline() == "* Choose a name:"
    await newcomer.send("carol")
    assert await newcomer.readline(3 * T) == f"! {UNAVAILABLE_TEXT}"
    assert await newcomer.readline() == "* Choose a name:"
    await cluster.redis.start()  # same port, empty
    assert await ana.readline(6 * T) == BACK
    gateway_log = cluster.gateways[0].log
    assert gateway_log is not None
    await gateway_log.wait_for("registration lost; registering again", timeout=6 * T)
    await newcomer.send("carol")
    assert (await newcomer.readline()).startswith("* Welcome, carol! 2 users online.")


# 16. Operators.
async def test_kick_and_announce_reach_websocket_users(cluster: Cluster) -> None:
    """An announcement reaches a WebSocket user; a kick gives it the reason and closes it,
    and the room sees the leave."""
    await cluster.start(2, *WEB)
    bob = await cluster.user(1, "bob")
    ana = await cluster.web_user(0, "ana")
    await bob.expect("* ana joined the chat")
    await admin(cluster, "announce", "maintenance at noon")
    assert await ana.readline() == "* [admin] maintenance at noon"
    await admin(cluster, "kick", "ana", "--reason", "spam")
    assert await ana.readline() == "! removed by an operator: spam"
    assert (await ana.closed())[0] == CloseCode.NORMAL_CLOSURE
    assert await bob.expect("* ana left the chat")


# 17. Gateway shutdown.
async def test_sigterm_tells_websocket_users_to_reconnect(cluster: Cluster) -> None:
    """SIGTERM: the WebSocket user gets the restart notice and a close; the others see its
    leave; the gateway exits 0."""
    await cluster.start(2, *WEB)
    bob = await cluster.user(1, "bob")
    ana = await cluster.web_user(0, "ana")
    await bob.expect("* ana joined the chat")
    cluster.gateways[0].signal(signal.SIGTERM)
    assert await ana.readline() == RESTART_NOTICE
    assert (await ana.closed(2 * T))[0] == CloseCode.NORMAL_CLOSURE
    assert await bob.readline(timeout=2 * T) == "* ana left the chat"
    assert await cluster.gateways[0].wait(3 * T) == 0


# Rooms and private messages.
async def test_rooms_and_private_messages_over_websocket(cluster: Cluster) -> None:
    """A WebSocket user joins a room that a TCP user on another gateway is in, lists the
    rooms, talks there, exchanges private messages with a user in another room, and goes
    back with /part."""
    await cluster.start(2, *WEB)
    bob = await cluster.user(1, "bob")
    carol = await cluster.user(1, "carol")
    ana = await cluster.web_user(0, "ana")
    await bob.expect("* ana joined the chat")
    await bob.send("/join #math")
    assert await bob.readline() == "* You are in #math now: 1 user here."
    assert await ana.expect("* bob left for #math")
    await ana.send("/join #Math")
    assert await ana.readline() == "* You are in #math now: 2 users here."
    assert await bob.readline() == "* ana joined #math"
    await ana.send("/rooms")
    assert [await ana.readline() for _ in range(3)] == [
        "* 2 rooms:",
        "*   #lobby: 1 user",
        "*   #math: 2 users",
    ]
    await ana.send("in math")
    assert await bob.readline() == "ana: in math"
    assert await ana.readline() == "ana: in math"
    await ana.send("/msg carol psst")
    assert await ana.readline() == "(private to carol) ana: psst"
    assert await carol.expect("(private) ana: psst")
    await carol.send("/msg ana hi back")
    assert await ana.readline() == "(private) carol: hi back"
    await ana.send("/part")
    assert await ana.readline() == "* You are in #lobby now: 2 users here."
    assert await bob.readline() == "* ana left for #lobby"


# Framing: what a WebSocket client may send that a TCP one cannot.
async def test_invalid_frames(cluster: Cluster) -> None:
    """A fragmented message is one line; a frame with a line break inside is refused with
    a `! ` line; a line over 4096 bytes is refused as on TCP and the connection goes on;
    past the frame limit the connection is closed with 1009; a binary frame closes it
    with 1003. Each close is a leave the room sees."""
    await cluster.start(2, *WEB)
    bob = await cluster.user(1, "bob")
    ana = await cluster.web_user(0, "ana")
    await bob.expect("* ana joined the chat")
    await ana.ws.send(["in ", "three ", "pieces"])
    assert await ana.readline() == "ana: in three pieces"
    await ana.send("two\nlines")
    assert await ana.readline() == f"! {FRAME_LINE_BREAK_TEXT}"
    await ana.send("x" * (MAX_LINE_BYTES + 1))
    assert await ana.readline() == f"! {LINE_TOO_LONG_TEXT}"
    await ana.send("after the refusals")
    assert await ana.readline() == "ana: after the refusals"
    assert await bob.readline() == "ana: in three pieces"
    assert await bob.readline() == "ana: after the refusals"  # nothing refused got through

    await ana.send("y" * (MAX_MESSAGE_BYTES + 1))
    assert (await ana.closed())[0] == CloseCode.MESSAGE_TOO_BIG
    assert await bob.readline() == "* ana left the chat"

    dan = await cluster.web_user(0, "dan")
    assert await bob.readline() == "* dan joined the chat"
    await dan.send(b"\x00binary")
    code, reason = await dan.closed()
    assert code == CloseCode.UNSUPPORTED_DATA and "text" in reason
    assert await bob.readline() == "* dan left the chat"


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(cluster: Cluster) -> None:
    """A text frame must be UTF-8 (RFC 6455): the library closes with 1007."""
    await cluster.start(1, *WEB)
    ana = await cluster.web_user(0, "ana")
    await ana.ws.send(b"\xff\xfe", text=True)
    assert (await ana.closed())[0] == CloseCode.INVALID_DATA


async def test_stats_count_websocket_connections(cluster: Cluster) -> None:
    """/stats counts WebSocket connections among the connections, and apart."""
    await cluster.start(1, "--health-port", "0", *WEB)
    await cluster.web_user(0, "ana")
    await cluster.user(0, "bob")
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.gateways[0].health_port)
    writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(T):
        reply = await reader.read()
    writer.close()
    body = reply.split(b"\r\n\r\n", 1)[1]
    assert b'"connections": 2' in body and b'"web_connections": 1' in body
    assert b'"users": 2' in body
