"""docker-compose.yml for real: README.md's compose steps, exactly and in order, against a
Docker engine, tested from the host through HAProxy's published port.

Needs a Docker engine with Compose v2 and the stack's base images: .ci/compose/run provides
them, then runs ``pytest -m compose tests/compose``; other runs deselect this module. The
published port is a free one (``CHAT_PORT``), and every client connects to it on 127.0.0.1.
Users are real ``chat-client`` processes in their pipe mode, which reconnect by themselves;
every line they print is kept with the time it arrived, so a moved user's gap (from the
restart notice to the welcome back) is measured, not guessed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
import websockets.asyncio.client

from tests.deploy_support import HAPROXY_CFG, ROOT
from tests.support import clean_env, free_port

pytestmark = [pytest.mark.compose, pytest.mark.timeout(420)]

PROJECT = "chat-service"
#: What a gateway's default id looks like in Compose: its container's name.
GATEWAY_ID = re.compile(rf"{PROJECT}-gateway-\d+")
#: Seconds a user moved off a gateway (scale-down, drain) may be out of the room, from the
#: restart notice to the welcome back (issue 12: it was over five seconds).
MAX_GAP = 2.0
RESTART_NOTICE = "* Server restarting: please reconnect."
#: Bounds for the Compose steps: the first `up` builds the project's image.
BUILD_TIMEOUT, STEP_TIMEOUT = 300.0, 120.0
#: Seconds to wait for anything a user or HAProxy should do by itself.
WAIT = 15.0


def say(text: str) -> None:
    """Progress and measurements, shown by the stage (pytest -s)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def readme_compose_steps() -> list[str]:
    """The `docker` commands of README.md's "With Docker Compose" block, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### With Docker Compose", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    assert block is not None, "README.md: no sh block under 'With Docker Compose'"
    lines = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line.startswith("docker ")]


async def run(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run a command in the repository; (exit status, stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{shlex.join(argv)} did not finish in {timeout:.0f}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


class Stack:
    """The compose project, driven by README.md's steps in order, plus the look-ups a test
    needs (`docker compose logs`, `ps`) between them."""

    def __init__(self) -> None:
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "COMPOSE_PROJECT_NAME"}
        self.env["CHAT_PORT"] = str(self.port)
        # The web port is published too: a free one, as for the chat port.
        self.env["CHAT_WEB_PORT"] = str(free_port())
        self.steps = readme_compose_steps()

    async def step(self, expected: str, timeout: float = STEP_TIMEOUT) -> str:
        """Run README's next compose command, which must start with ``expected``."""
        assert self.steps, f"README.md has no step left; the test wanted {expected!r}"
        line = self.steps.pop(0)
        assert line.startswith(expected), f"README's next step is {line!r}, not {expected!r}"
        say(f"$ {line}")
        started = time.monotonic()
        status, out = await run(shlex.split(line), self.env, timeout)
        assert status == 0, f"{line} exited {status}:\n{out}"
        say(f"  ({time.monotonic() - started:.1f}s)")
        return out

    async def docker(self, *args: str, timeout: float = STEP_TIMEOUT) -> str:
        status, out = await run(["docker", *args], self.env, timeout)
        assert status == 0, f"docker {shlex.join(args)} exited {status}:\n{out}"
        return out

    async def running_gateways(self) -> set[str]:
        out = await self.docker("compose", "ps", "--format", "{{.Name}}", "gateway")
        return set(out.split())

    async def who(self) -> dict[str, str]:
        """`docker compose run --rm admin who`'s table: name -> gateway id."""
        out = await self.docker("compose", "run", "--rm", "admin", "who")
        return parse_who(out)

    async def lb_servers_up(self, count: int) -> None:
        """Wait until HAProxy has ``count`` gateways up, following its log: a server filled
        in by DNS is up ("is UP/READY") until a check says otherwise ("is DOWN")."""
        pattern = re.compile(r"Server gateways/(gw\d+) (?:\('[^']*'\) )?is (?:going )?(UP|DOWN)")
        log = ""
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    log = await self.docker("compose", "logs", "--no-color", "lb")
                    state = {m.group(1): m.group(2) for m in pattern.finditer(log)}
                    if sum(s == "UP" for s in state.values()) >= count:
                        return
                    await asyncio.sleep(0.5)
        except TimeoutError:
            raise AssertionError(f"HAProxy has not {count} gateways up:\n{log}") from None

    async def resubscriptions(self) -> int:
        """How many times the gateways have subscribed to the bus again, by their logs."""
        log = await self.docker("compose", "logs", "--no-color", "gateway")
        return log.count("bus subscription restored")

    async def wait_resubscribed(self, count: int) -> None:
        """Wait until the gateways' logs show ``count`` re-subscriptions in all."""
        try:
            async with asyncio.timeout(WAIT):  # the logs are the one place that says so
                while True:
                    if await self.resubscriptions() >= count:
                        return
                    await asyncio.sleep(0.5)
        except TimeoutError:
            log = await self.docker("compose", "logs", "--no-color", "gateway")
            raise AssertionError(f"gateways not back on the bus:\n{log[-3000:]}") from None

    async def leftovers(self) -> dict[str, list[str]]:
        """The project's containers, networks and volumes that still exist."""
        label = f"label=com.docker.compose.project={PROJECT}"
        found = {}
        for kind in ("container", "network", "volume"):
            listing = ["ls", "-a"] if kind == "container" else ["ls"]
            out = await self.docker(kind, *listing, "-q", "--filter", label)
            found[kind] = out.split()
        return found


def parse_who(out: str) -> dict[str, str]:
    """{user: gateway} from `chat-admin who`'s table."""
    lines = out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["NAME"])
    column = lines[header].split().index("GATEWAY")  # the columns before it are one word
    return {
        fields[0]: fields[column]
        for fields in (line.split() for line in lines[header + 1 :])
        if len(fields) > column and not re.fullmatch(r"\d+ user\(s\) online", " ".join(fields))
    }


class User:
    """`chat-client` as a pipe, on the host, through HAProxy's published port."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        #: (arrival time, "out" or "err", line) for every line the client printed.
        self.lines: list[tuple[float, str, str]] = []
        self._changed = asyncio.Condition()
        self.proc: asyncio.subprocess.Process | None = None
        self._pumps: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "client", "--host", "127.0.0.1", "--port", str(self.port),
            "--name", self.name, env=clean_env(), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self._pump(self.proc.stdout, "out")),
            asyncio.create_task(self._pump(self.proc.stderr, "err")),
        ]
        await self.wait_for(rf"^\* Welcome, {self.name}!")

    async def _pump(self, stream: asyncio.StreamReader, kind: str) -> None:
        while raw := await stream.readline():
            async with self._changed:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.lines.append((time.monotonic(), kind, line))
                self._changed.notify_all()

    def mark(self) -> int:
        return len(self.lines)

    async def wait_for(self, pattern: str, start: int = 0, timeout: float = WAIT) -> int:
        """The index of the first stdout line from ``start`` on matching ``pattern``."""
        regex = re.compile(pattern)
        try:
            async with asyncio.timeout(timeout), self._changed:
                while True:
                    for i in range(start, len(self.lines)):
                        if self.lines[i][1] == "out" and regex.search(self.lines[i][2]):
                            return i
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self.name} did not see {pattern!r} in {timeout:.0f}s:\n" + self.text(start)
            ) from None

    def text(self, start: int = 0) -> str:
        return "\n".join(f"  {kind} {line}" for _, kind, line in self.lines[start:])

    def notices(self, start: int) -> list[int]:
        return [
            i for i in range(start, len(self.lines)) if self.lines[i][1:] == ("out", RESTART_NOTICE)
        ]

    async def gap(self, notice: int) -> float:
        """Seconds from the restart notice at index ``notice`` to the welcome back."""
        back = await self.wait_for(rf"^\* Welcome, {self.name}!", notice)
        return self.lines[back][0] - self.lines[notice][0]

    def send(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")

    async def close(self) -> None:
        """End of input: the pipe client leaves and exits by itself; killed if it does not."""
        if self.proc is None:
            return
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(WAIT):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        for pump in self._pumps:
            pump.cancel()


async def chat_round(users: Iterable[User], speaker: User, text: str) -> None:
    """``speaker`` says ``text``; everyone, the speaker included, sees it."""
    everyone = list(users)
    marks = {u.name: u.mark() for u in everyone}
    speaker.send(text)
    for user in everyone:
        await user.wait_for(rf"^{speaker.name}: {re.escape(text)}$", marks[user.name])


async def web_user_chats(port: int, listener: User) -> None:
    """GET / through ``port`` is the page; a WebSocket user there logs in, says a line
    that ``listener`` (a line-protocol user) reads, and leaves."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(WAIT):
        page = await reader.read()
    writer.close()
    assert page.startswith(b"HTTP/1.1 200 ") and b"<title>chat</title>" in page, page[:200]
    say(f"  GET / through :{port}: {len(page)} bytes, the page")
    mark = listener.mark()
    async with websockets.asyncio.client.connect(
        f"ws://127.0.0.1:{port}/ws", open_timeout=WAIT
    ) as ws:
        async with asyncio.timeout(WAIT):
            assert await ws.recv() == "* Choose a name:"
            await ws.send("dana")
            assert str(await ws.recv()).startswith("* Welcome, dana! ")
            await ws.send("hello from a browser")
            await listener.wait_for(r"^dana: hello from a browser$", mark)
    await listener.wait_for(r"^\* dana left the chat$", mark)
    say("  a WebSocket user through HAProxy chatted with the line users")


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    """The project, removed whatever the test did (`down -v` is also README's last step)."""
    s = Stack()
    running = await s.docker("compose", "ps", "-aq")
    assert not running.split(), f"a {PROJECT} stack is already up here: docker compose down -v"
    try:
        yield s
    finally:
        await run(["docker", "compose", "down", "-v", "--timeout", "5"], s.env, STEP_TIMEOUT)


async def moved_users_back(users: list[User], since: dict[str, int], what: str) -> list[str]:
    """Names of the users told to reconnect since ``since``, each asserted back in the room
    within MAX_GAP; the gaps are reported."""
    moved = []
    for user in users:
        notices = user.notices(since[user.name])
        if not notices:
            continue
        assert len(notices) == 1, f"{user.name} was moved twice:\n{user.text(since[user.name])}"
        gap = await user.gap(notices[0])
        say(f"  {what}: {user.name} back in the room after {gap:.2f}s")
        assert gap < MAX_GAP, f"{user.name} out for {gap:.2f}s:\n{user.text(since[user.name])}"
        moved.append(user.name)
    return moved


async def test_readme_compose_steps_end_to_end(stack: Stack) -> None:
    """README's compose steps, run as written: the stack comes up healthy (HAProxy
    included); users through the published port land on different gateways and chat; `admin
    who` names each user's gateway by its container name; the web port serves the page,
    and a WebSocket user chats with them; scaling to 5 moves nobody, scaling
    back to 2 and `docker stop` of a gateway move only that gateway's users, each back in
    under two seconds; `restart redis` keeps presence and history (append-only file); a
    load balancer that cannot start makes `up --wait` fail; `down -v` leaves no container,
    network or volume."""
    await stack.step("docker compose up --build --scale gateway=3 -d --wait", BUILD_TIMEOUT)
    assert await stack.running_gateways() == {f"{PROJECT}-gateway-{n}" for n in (1, 2, 3)}
    await stack.lb_servers_up(3)

    # README's chat-client step: three users through the one published port, one after the
    # other, so leastconn gives each its own gateway.
    users: list[User] = []
    try:
        for name in ["ana", "bruno", "chen"]:
            user = User(name, stack.port)
            users.append(user)
            await user.start()
        await chat_round(users, users[0], "bom dia from the host")
        await chat_round(users, users[1], "bom dia, ana")

        where = parse_who(await stack.step("docker compose run --rm admin who"))
        say(f"  who: {where}")
        assert set(where) == {"ana", "bruno", "chen"}
        assert all(GATEWAY_ID.fullmatch(g) for g in where.values()), where
        assert len(set(where.values())) == 3, f"not one user per gateway: {where}"

        # The chat page, through HAProxy's published web port, and its WebSocket: a
        # browser user chats with the users of the line protocol.
        await web_user_chats(int(stack.env["CHAT_WEB_PORT"]), users[0])

        # Scale up: new gateways join the rotation; nobody is moved.
        since = {u.name: u.mark() for u in users}
        await stack.step("docker compose up -d --wait --scale gateway=5")
        assert len(await stack.running_gateways()) == 5
        assert not any(u.notices(since[u.name]) for u in users)
        await stack.lb_servers_up(5)

        # Scale down: the removed gateways drain; their users are moved, quickly.
        since = {u.name: u.mark() for u in users}
        await stack.step("docker compose up -d --wait --scale gateway=2")
        remaining = await stack.running_gateways()
        assert len(remaining) == 2
        expected = sorted(n for n, g in where.items() if g not in remaining)
        assert await moved_users_back(users, since, "scale 5 -> 2") == expected
        await chat_round(users, users[2], "still here after the scale-down")
        where = await stack.who()
        assert set(where.values()) <= remaining, where

        # Drain the one gateway README names: only its users move, and quickly.
        since = {u.name: u.mark() for u in users}
        out = await stack.step("docker stop")
        (stopped,) = out.split()
        expected = sorted(n for n, g in where.items() if g == stopped)
        assert expected, f"nobody on {stopped} to drain: {where}"
        assert await moved_users_back(users, since, f"drain of {stopped}") == expected
        await chat_round(users, users[0], "still here after the drain")
        where = await stack.who()
        assert stopped not in where.values() and len(where) == 3, where

        # Redis restarts from its append-only file: presence and history are still there.
        restored = await stack.resubscriptions()
        await stack.step("docker compose restart redis")
        await stack.wait_resubscribed(restored + len(await stack.running_gateways()))
        assert await stack.who() == where
        late = User("dana", stack.port)
        users.append(late)
        await late.start()
        await late.wait_for(r"UTC\] ana: still here after the drain$")
    finally:
        await asyncio.gather(*(u.close() for u in users))

    await lb_that_cannot_start_fails_up(stack)

    await stack.step("docker compose down -v")
    assert await stack.leftovers() == {"container": [], "network": [], "volume": []}
    assert not stack.steps, f"README steps the test did not run: {stack.steps}"


async def lb_that_cannot_start_fails_up(stack: Stack) -> None:
    """With a configuration HAProxy refuses, the lb container crash-loops; its health check
    makes `docker compose up -d --wait` say so (exit status not 0) instead of exiting 0."""
    with tempfile.TemporaryDirectory(prefix="chat-compose-") as tmp:
        broken = Path(tmp) / "haproxy.cfg"
        broken.write_text(HAPROXY_CFG.read_text() + "\nbackend broken\n    no-such-keyword\n")
        override = Path(tmp) / "broken-lb.yml"
        override.write_text(
            "services:\n  lb:\n    volumes: !override\n"
            f"      - {broken}:/usr/local/etc/haproxy/haproxy.cfg:ro\n"
        )
        argv = ["docker", "compose", "-f", "docker-compose.yml", "-f", str(override)]
        started = time.monotonic()
        status, out = await run(
            [*argv, "up", "-d", "--wait", "--wait-timeout", "30", "lb"], stack.env, STEP_TIMEOUT
        )
        say(f"  up --wait with a broken lb: exit {status} after {time.monotonic() - started:.1f}s")
        assert status != 0, f"`up --wait` exited 0 with HAProxy unable to start:\n{out}"
