"""The web port in process: the page over HTTP, and WebSocket frames mapped to lines.

A gateway on the embedded broker with its web port on; clients are the websockets
library's own client and, for the HTTP side, raw sockets. The numbered points of
PROTOCOL.md over WebSocket, across real gateways and Redis, are in
tests/integration/test_websocket.py.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator

import pytest
from websockets.frames import CloseCode

from broker import RedisBroker
from chatwire.lines import MAX_LINE_BYTES
from chatwire.texts import FRAME_LINE_BREAK_TEXT, LINE_TOO_LONG_TEXT, SERVER_FULL_TEXT
from gateway.config import GatewayConfig
from gateway.server import Gateway
from gateway.web.server import _csp, page
from gateway.web.transport import MAX_MESSAGE_BYTES
from tests.support import ChatClient, T, WsClient, port_of


async def started(**config: int) -> Gateway:
    gw = Gateway(
        GatewayConfig(host="127.0.0.1", port=0, web_port=0, history=0, **config),
        RedisBroker.embedded(),
    )
    await gw.start()
    return gw


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    gw = await started()
    yield gw
    async with asyncio.timeout(3 * T):
        await gw.shutdown()


def web_port(gateway: Gateway) -> int:
    assert gateway._web is not None and gateway._web._server is not None
    port: int = gateway._web._server.sockets[0].getsockname()[1]
    return port


async def http_get(port: int, path: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a plain HTTP/1.1 GET."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
        async with asyncio.timeout(T):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode().split("\r\n")
            fields = dict(
                (k.lower(), v.strip()) for k, _, v in (x.partition(":") for x in lines if x)
            )
            body = await reader.readexactly(int(fields.get("content-length", "0")))
    finally:
        writer.close()
    return int(status_line.split()[1]), fields, body


async def ws_user(gateway: Gateway, name: str) -> WsClient:
    client = await WsClient.connect(web_port(gateway))
    await client.login(name)
    return client


# -- the page ------------------------------------------------------------------------------


async def test_the_page_is_served_at_the_root_self_contained(gateway: Gateway) -> None:
    """GET / is the chat page as shipped in the package, HTML in UTF-8, with a policy that
    runs only its own inline script and style and connects only to its own origin; it
    names no other host, so it works on a network without the internet."""
    status, headers, body = await http_get(web_port(gateway), "/")
    assert status == 200
    assert body == page()
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"] == _csp(body)
    assert "connect-src 'self'" in headers["content-security-policy"]
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+';", headers["content-security-policy"])
    assert not re.search(rb"(src|href)=[\"']?(https?:)?//", body), "an external resource"
    assert b"innerHTML" not in body, "user text must go in as text, never as HTML"
    status, _, _ = await http_get(web_port(gateway), "/?from=bookmark")
    assert status == 200


async def test_other_paths_are_not_found_and_ws_wants_an_upgrade(gateway: Gateway) -> None:
    """Anything but / and /ws is 404; a plain GET of /ws (no upgrade) is refused."""
    status, _, body = await http_get(web_port(gateway), "/index.html")
    assert status == 404 and b"/ws" in body
    status, _, _ = await http_get(web_port(gateway), "/ws")
    assert status == 426  # Upgrade Required


# -- frames and lines ----------------------------------------------------------------------


async def test_a_websocket_and_a_tcp_client_share_the_room(gateway: Gateway) -> None:
    """One text frame per line each way; the same protocol as on TCP."""
    ana = await ws_user(gateway, "ana")
    bob = await ChatClient.connect(port_of(gateway))
    await bob.login("bob")
    assert await ana.readline() == "* bob joined the chat"
    await ana.send("hello from the web")
    assert await ana.readline() == "ana: hello from the web"
    assert await bob.readline() == "ana: hello from the web"
    await bob.send("hello from nc")
    assert await ana.readline() == "bob: hello from nc"
    assert await bob.readline() == "bob: hello from nc"
    await ana.send("/who")
    assert await ana.expect("*   bob") == ["* 2 users online:", "*   ana", "*   bob"]
    await ana.send("sair")
    assert await ana.readline() == "* Goodbye, ana!"
    assert await ana.closed() == (CloseCode.NORMAL_CLOSURE, "")
    assert await bob.readline() == "* ana left the chat"
    await bob.close()


async def test_one_trailing_line_ending_is_allowed(gateway: Gateway) -> None:
    """A frame may end with the LF or CRLF a line would have on TCP; it is not sent."""
    ana = await ws_user(gateway, "ana")
    await ana.send("one\n")
    assert await ana.readline() == "ana: one"
    await ana.send("two\r\n")
    assert await ana.readline() == "ana: two"
    await ana.close()


async def test_a_frame_with_a_line_break_inside_is_refused(gateway: Gateway) -> None:
    """A frame carries one line: one with a break inside gets a ``! `` line and is not
    sent (before login, the prompt follows, as after a line too long)."""
    client = await WsClient.connect(web_port(gateway))
    assert await client.readline() == "* Choose a name:"
    await client.send("ana\nbob")
    assert await client.readline() == f"! {FRAME_LINE_BREAK_TEXT}"
    assert await client.readline() == "* Choose a name:"
    await client.send("ana")
    assert (await client.readline()).startswith("* Welcome, ana!")
    await client.send("first\nsecond")
    assert await client.readline() == f"! {FRAME_LINE_BREAK_TEXT}"
    await client.send("still here")
    assert await client.readline() == "ana: still here"
    await client.close()


async def test_a_fragmented_frame_is_one_line(gateway: Gateway) -> None:
    """A message sent in fragments is reassembled by the server: one line."""
    ana = await ws_user(gateway, "ana")
    await ana.ws.send(["frag", "ment", "ed"])
    assert await ana.readline() == "ana: fragmented"
    await ana.close()


async def test_a_line_over_the_limit_is_refused_and_the_connection_goes_on(
    gateway: Gateway,
) -> None:
    """Over 4096 bytes, as on TCP: ``! line too long``, nothing sent, still connected.
    Exactly 4096 bytes is a line."""
    ana = await ws_user(gateway, "ana")
    await ana.send("é" * (MAX_LINE_BYTES // 2 + 1))  # 4098 bytes, 2049 characters
    assert await ana.readline() == f"! {LINE_TOO_LONG_TEXT}"
    await ana.send("x" * MAX_LINE_BYTES)
    assert await ana.readline() == "ana: " + "x" * MAX_LINE_BYTES
    await ana.close()


async def test_a_message_over_the_frame_limit_closes_with_1009(gateway: Gateway) -> None:
    """Past MAX_MESSAGE_BYTES the message is not even buffered: close 1009, and the user
    is gone (its leave announced)."""
    ana = await ws_user(gateway, "ana")
    bob = await ws_user(gateway, "bob")
    assert await ana.readline() == "* bob joined the chat"
    await bob.send("x" * (MAX_MESSAGE_BYTES + 1))
    code, _ = await bob.closed()
    assert code == CloseCode.MESSAGE_TOO_BIG
    assert await ana.readline() == "* bob left the chat"
    await ana.close()


async def test_a_binary_frame_closes_with_1003(gateway: Gateway) -> None:
    """Binary frames are not lines: close 1003 (unsupported data), leave announced."""
    ana = await ws_user(gateway, "ana")
    bob = await ws_user(gateway, "bob")
    assert await ana.readline() == "* bob joined the chat"
    await bob.send(b"\x00\x01binary")
    code, reason = await bob.closed()
    assert code == CloseCode.UNSUPPORTED_DATA and "text" in reason
    assert await ana.readline() == "* bob left the chat"
    await ana.close()


async def test_websocket_clients_count_in_the_limits_and_stats() -> None:
    """--max-clients counts TCP and WebSocket connections together; /stats shows both."""
    gw = await started(max_clients=2)
    try:
        tcp = await ChatClient.connect(port_of(gw))
        assert await tcp.readline() == "* Choose a name:"
        web = await WsClient.connect(web_port(gw))
        assert await web.readline() == "* Choose a name:"
        assert gw.stats()["connections"] == 2 and gw.stats()["web_connections"] == 1
        refused = await WsClient.connect(web_port(gw))
        assert await refused.readline() == f"! {SERVER_FULL_TEXT}"
        code, _ = await refused.closed()
        assert code == CloseCode.NORMAL_CLOSURE
        await web.close()
        await tcp.close()
    finally:
        async with asyncio.timeout(3 * T):
            await gw.shutdown()


async def test_shutdown_tells_websocket_clients_to_reconnect() -> None:
    """The drain notice reaches WebSocket clients too, then their connection is closed."""
    gw = await started()
    ana = await ws_user(gw, "ana")
    stopping = asyncio.create_task(gw.shutdown())
    assert await ana.readline() == "* Server restarting: please reconnect."
    code, _ = await ana.closed()
    assert code == CloseCode.NORMAL_CLOSURE
    async with asyncio.timeout(3 * T):
        await stopping


async def test_websocket_connections_get_tcp_keepalive(gateway: Gateway) -> None:
    """PROTOCOL.md 15: a browser whose host vanished is found by TCP keepalive too; the
    gateway sets it on the WebSocket's socket as on a TCP client's."""
    client = await WsClient.connect(web_port(gateway))
    assert await client.readline() == "* Choose a name:"
    (session,) = gateway.sessions()
    assert session._transport is not None
    sock = session._transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
    await client.close()
