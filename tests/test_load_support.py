"""The helpers the tests under load rely on to judge a run (tests/load_support.py), against
a scripted server on loopback that writes each user exactly what a test tells it to."""

from __future__ import annotations

import asyncio
from asyncio import StreamReader, StreamWriter

import pytest

from chatwire.texts import PROMPT, notice_line, welcome_text
from tests.load_support import MessageLog, check_exactly_once, log_in, settle_room
from tests.support import T


class ScriptedServer:
    """Welcomes whoever logs in, then writes each user only the lines ``send`` is given."""

    def __init__(self) -> None:
        self.writers: dict[str, StreamWriter] = {}
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: StreamReader, writer: StreamWriter) -> None:
        writer.write(notice_line(PROMPT))
        name = (await reader.readline()).decode().strip()
        self.writers[name] = writer
        writer.write(notice_line(welcome_text(name, len(self.writers))))
        while await reader.read(1 << 16):  # what the user says goes nowhere by itself
            pass
        writer.close()

    def send(self, name: str, *lines: str) -> None:
        self.writers[name].write("".join(line + "\n" for line in lines).encode())

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def test_a_room_is_settled_only_once_every_member_read_every_line_echoed() -> None:
    """A line can be echoed after a higher-numbered one (its gateway held it through a
    failover while another published a later line): a member who read the highest but not
    that one has not settled yet, and the run is judged only once it arrives."""
    server = ScriptedServer()
    port = await server.start()
    b0 = await log_in(port, 0, "b0")
    b1 = await log_in(port, 1, "b1")
    try:
        log = MessageLog()
        held = b1.say(log)
        marker = b0.say(log)
        server.send("b0", f"b0: {marker}")
        server.send("b1", f"b0: {marker}", f"b1: {held}")
        with pytest.raises(AssertionError, match=rf"b0 has not read \[{held}\]"):
            await settle_room([b0, b1], [b0, b1], timeout=0.2)
        server.send("b0", f"b1: {held}")
        await settle_room([b0, b1], [b0, b1], timeout=T)
        check_exactly_once([b0, b1], log, [b0, b1])
        assert list(b0.msg_ids) == list(b1.msg_ids) == [marker, held]
    finally:
        await asyncio.gather(b0.close(), b1.close())
        server.close()
