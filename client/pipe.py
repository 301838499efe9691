"""The client as a plain pipe: stdin lines out, server lines to stdout unchanged.

This is what makes the client scriptable (``printf 'hi\\n' | chat-client --name bot``); the
client's own news goes to stderr so stdout carries exactly what the server said.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from contextlib import suppress
from typing import BinaryIO, TextIO

from client.protocol import ServerLine


class PipeUI:
    """Line-by-line UI on stdin, stdout and stderr."""

    def __init__(
        self,
        stdin: BinaryIO | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self._stdin = stdin or sys.stdin.buffer
        self._stdout = stdout or sys.stdout
        self._stderr = stderr or sys.stderr
        self._lines: asyncio.Queue[str | None] | None = None

    def show(self, line: ServerLine) -> None:
        self._stdout.write(line.raw + "\n")
        self._stdout.flush()

    def status(self, text: str) -> None:
        self._stderr.write(f"chat-client: {text}\n")
        self._stderr.flush()

    def joined(self, name: str) -> None:
        pass

    async def ask_name(self) -> str | None:
        """The first line of input is the name when --name was not given."""
        return await self.read_input()

    async def read_input(self) -> str | None:
        if self._lines is None:
            self._lines = asyncio.Queue()
            self._start_reader(self._lines)
        return await self._lines.get()

    def _start_reader(self, queue: asyncio.Queue[str | None]) -> None:
        # A daemon thread: blocking reads work on pipes, files and terminals alike, and a
        # read still pending when the chat ends cannot hold the process open.
        loop = asyncio.get_running_loop()

        def pump() -> None:
            try:
                for raw in self._stdin:
                    text = raw.decode("utf-8", "replace").rstrip("\r\n")
                    loop.call_soon_threadsafe(queue.put_nowait, text)
            except (OSError, ValueError):
                pass
            finally:
                with suppress(RuntimeError):  # the loop is already closed: nobody waits
                    loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=pump, name="stdin", daemon=True).start()
