"""Real parts for integration tests: a redis-server, chat-gateway processes, line clients.

Every wait here is for an event (a log line, a received line, a process exit) bounded by a
multiple of one timeout unit, ``T`` seconds (``CHAT_TEST_TIMEOUT``, default 5).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

T = float(os.environ.get("CHAT_TEST_TIMEOUT", "5"))

BIN = Path(sys.executable).parent


if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

    from gateway.server import Gateway


def port_of(gateway: Gateway) -> int:
    """The port an in-process gateway listens on (it was started on port 0)."""
    return int(gateway.address.rsplit(":", 1)[1])


#: Where test servers listen: below Linux's ephemeral range (32768-60999 by default), from
#: which every outgoing connection takes its local port. A port picked there could be taken
#: by some client's connection before the server that was to listen on it is up (a Redis
#: Cluster node once failed to start that way, its bus port taken).
PORTS = range(20_000, 32_000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never handed out before by this process."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.choice(PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that would point our programs at another Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CHAT_"))}
    env.update(extra)
    return env


class LogWatcher:
    """Collects a process's output lines; lets a test await a line matching a pattern."""

    def __init__(self, stream: asyncio.StreamReader, label: str) -> None:
        self.lines: list[str] = []
        self.label = label
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._pump(stream))

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            async with self._changed:
                self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, pattern: str, timeout: float = 3 * T, start: int = 0) -> re.Match[str]:
        """The first line at index >= ``start`` matching ``pattern`` (a regex)."""
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for line in self.lines[start:]:
                    if m := regex.search(line):
                        return m
                if self._task.done():
                    raise AssertionError(
                        f"{self.label} ended without logging {pattern!r}:\n" + self.text()
                    )
                await self._changed.wait()

    def text(self) -> str:
        return "\n".join(self.lines)

    async def close(self) -> None:
        try:
            async with asyncio.timeout(T):
                await self._task
        except TimeoutError:
            self._task.cancel()


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port: no persistence, or with
    ``persistent`` an append-only file (fsync every second), as compose runs it."""

    def __init__(self, persistent: bool = False) -> None:
        self.persistent = persistent
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.log: LogWatcher | None = None
        self._dir = tempfile.mkdtemp(prefix="chat-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """The same server through its Unix socket, as a gateway on its host may reach it."""
        return f"unix://{self._dir}/redis.sock?db=0"

    @property
    def urls(self) -> list[str]:
        """Where gateways may be pointed: here, the one server."""
        return [self.url]

    async def start(self, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: the integration tests need it")
        self.port = port or self.port or free_port()
        self.proc = await asyncio.create_subprocess_exec(
            exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "everysec",
            "--dir", self._dir, "--daemonize", "no",
            "--unixsocket", f"{self._dir}/redis.sock", "--unixsocketperm", "700",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.log = LogWatcher(self.proc.stdout, f"redis-server :{self.port}")
        await self.log.wait_for(r"Ready to accept connections")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(2 * T):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.log is not None:
            await self.log.close()
        self.proc = None

    async def close(self) -> None:
        """Stop for good and remove the working directory (``stop`` allows a restart)."""
        await self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


class GatewayProcess:
    """A real ``chat-gateway`` process on a free loopback port."""

    def __init__(self, gateway_id: str, redis_url: str | None, *extra: str) -> None:
        self.gateway_id = gateway_id
        self.redis_url = redis_url
        self.extra = extra
        self.port = 0
        self.health_port = 0
        self.tls_port = 0
        self.web_port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.log: LogWatcher | None = None

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> None:
        args = ["--host", host, "--port", str(port), "--gateway-id", self.gateway_id]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        self.proc = await asyncio.create_subprocess_exec(
            str(BIN / "chat-gateway"), *args, *self.extra,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=clean_env(),
        )  # fmt: skip
        assert self.proc.stderr is not None
        self.log = LogWatcher(self.proc.stderr, f"gateway {self.gateway_id}")
        match = await self.log.wait_for(r"listening on [\d.]+:(\d+)")
        self.port = int(match.group(1))
        if "--tls-port" in self.extra:
            match = await self.log.wait_for(r"listening for TLS on [\d.]+:(\d+)")
            self.tls_port = int(match.group(1))
        if "--web-port" in self.extra:
            match = await self.log.wait_for(r"web page and WebSocket on [\d.]+:(\d+)")
            self.web_port = int(match.group(1))
        if "--health-port" in self.extra:
            match = await self.log.wait_for(r"health endpoint on [\d.]+:(\d+)")
            self.health_port = int(match.group(1))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await self.wait(3 * T)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.log is not None:
            await self.log.close()

    def assert_no_traceback(self) -> None:
        assert self.log is not None
        assert "Traceback" not in self.log.text(), self.log.text()


class LineClient:
    """What a test does with a line client, whatever carries its lines (TCP, TLS or a
    WebSocket): subclasses give ``send``, ``readline`` and ``name``."""

    async def send(self, line: str | bytes) -> None:
        raise NotImplementedError

    async def readline(self, timeout: float = T) -> str:
        raise NotImplementedError

    async def expect(self, want: str | Callable[[str], bool], timeout: float = T) -> list[str]:
        """Read until a line equal to ``want`` (or satisfying it); return every line read."""
        seen: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.readline(timeout)
                seen.append(line)
                if (line == want) if isinstance(want, str) else want(line):
                    return seen

    async def login(self, name: str) -> str:
        """Answer the prompt with ``name``; return the welcome line."""
        assert await self.readline() == "* Choose a name:"
        await self.send(name)
        line = await self.readline()
        assert line.startswith(f"* Welcome, {name}!"), line
        self.name = name
        return line


class ChatClient(LineClient):
    """A line client speaking the wire protocol directly, as netcat would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.name: str | None = None

    @classmethod
    async def connect(
        cls,
        port: int,
        rcvbuf: int | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
    ) -> ChatClient:
        """Connect to ``port`` on loopback; with ``tls``, over TLS, checking the server's
        certificate for ``server_hostname`` (as far as ``tls`` checks it)."""
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        if tls is None:
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        else:
            async with asyncio.timeout(T):
                reader, writer = await asyncio.open_connection(
                    sock=sock, limit=1 << 20, ssl=tls, server_hostname=server_hostname
                )
        return cls(reader, writer)

    async def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode()
        self.writer.write(data if data.endswith(b"\n") else data + b"\n")
        await self.writer.drain()

    async def readline(self, timeout: float = T) -> str:
        """The next line, strictly decoded (the server must only ever send valid UTF-8)."""
        async with asyncio.timeout(timeout):
            raw = await self.reader.readline()
        if not raw:
            raise EOFError("the server closed the connection")
        assert raw.endswith(b"\n"), raw
        return raw[:-1].decode("utf-8")

    async def at_eof(self, timeout: float = T) -> bool:
        """True once the server has closed, reading and discarding what comes before."""
        async with asyncio.timeout(timeout):
            while await self.reader.read(65536):
                pass
        return True

    def reset(self) -> None:
        """Drop the connection with a TCP RST, as a crashing client host would."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(T):
                await self.writer.wait_closed()
        except (OSError, TimeoutError):
            pass


async def flood_past(stalled_name: str, watcher: ChatClient, flooder: ChatClient) -> None:
    """``flooder`` says 2,500 lines of 4 kB (10 MB: far past the 1 MiB a gateway queues
    per client, plus every buffer on the way) while ``stalled_name``, logged in, reads
    nothing: ``watcher`` and ``flooder`` see every line in order, and the stalled reader
    leave."""
    await watcher.expect(f"* {stalled_name} joined the chat")
    await flooder.expect(f"* {stalled_name} joined the chat")
    count, body = 2500, "z" * 4000

    async def flood() -> None:
        for n in range(count):
            flooder.writer.write(f"{n:05d} {body}\n".encode())
            await flooder.writer.drain()

    async def drain(client: ChatClient) -> list[str]:
        return await client.expect(lambda line: line.startswith(f"flooder: {count - 1:05d}"), 6 * T)

    _, seen, _ = await asyncio.gather(flood(), drain(watcher), drain(flooder))
    chat = [line[9:14] for line in seen if line.startswith("flooder: ")]
    assert chat == [f"{n:05d}" for n in range(count)]
    if f"* {stalled_name} left the chat" not in seen:  # cut after the last line was queued
        await watcher.expect(f"* {stalled_name} left the chat")


async def run_cli(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run one of the project's console scripts (with ``env`` added to a clean
    environment); return (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / args[0]), *args[1:], env=clean_env(**(env or {})),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(6 * T):
        out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class TcpProxy:
    """A loopback TCP proxy in front of a server, that a test can cut and restore.

    Cutting closes every proxied connection and stops listening (new connections are
    refused), as a broken network path between a gateway and Redis would look.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._pipes |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._pipes -= {writer, up_writer}

    async def close(self) -> None:
        if self._server is not None:
            await self.cut()


class Timers:
    """Takes over the running loop's call_later: timers fire only when the test says so."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        loop = asyncio.get_running_loop()
        real = loop.call_later
        self.scheduled: list[tuple[float, Callable[[], Any], asyncio.TimerHandle]] = []

        def call_later(delay: float, callback: Callable[[], Any], *args: Any) -> Any:
            handle = real(3600, callback, *args)  # never fires within a test on its own
            self.scheduled.append((delay, lambda: callback(*args), handle))
            return handle

        monkeypatch.setattr(loop, "call_later", call_later)

    def pending(self) -> list[asyncio.TimerHandle]:
        return [handle for _, _, handle in self.scheduled if not handle.cancelled()]

    def fire(self) -> None:
        """Run every timer scheduled and not cancelled, as if its time had come."""
        due, self.scheduled = self.scheduled, []
        for _, callback, handle in due:
            if not handle.cancelled():
                handle.cancel()
                callback()


class WsClient(LineClient):
    """A WebSocket client of the web port's ``/ws``, with :class:`ChatClient`'s manners:
    one text frame per line each way."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.name: str | None = None

    @classmethod
    async def connect(
        cls, port: int, path: str = "/ws", rcvbuf: int | None = None, **kwargs: Any
    ) -> WsClient:
        """Connect; ``rcvbuf`` shrinks the socket's receive buffer (a slow reader)."""
        from websockets.asyncio.client import connect

        if rcvbuf is not None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            kwargs["sock"] = sock
        url = f"ws://127.0.0.1:{port}{path}"
        async with asyncio.timeout(T):
            ws = await connect(url, compression=None, **kwargs)
        return cls(ws)

    async def send(self, line: str | bytes) -> None:
        await self.ws.send(line)

    async def readline(self, timeout: float = T) -> str:
        """The next frame's text (a frame is a line); EOFError once the server closed."""
        from websockets.exceptions import ConnectionClosed

        try:
            async with asyncio.timeout(timeout):
                frame = await self.ws.recv()
        except ConnectionClosed:
            raise EOFError("the server closed the connection") from None
        assert isinstance(frame, str), f"a binary frame from the server: {frame!r}"
        assert "\n" not in frame, frame
        return frame

    async def closed(self, timeout: float = T) -> tuple[int | None, str]:
        """(close code, reason) once the server has closed, discarding frames before."""
        from websockets.exceptions import ConnectionClosed

        async with asyncio.timeout(timeout):
            try:
                while True:
                    await self.ws.recv()
            except ConnectionClosed:
                pass
            await self.ws.wait_closed()
        # The sans-I/O protocol's: the connection's own properties are newer than 14.0.
        return self.ws.protocol.close_code, self.ws.protocol.close_reason or ""

    async def close(self) -> None:
        try:
            async with asyncio.timeout(T):
                await self.ws.close()
        except (OSError, TimeoutError):
            pass
