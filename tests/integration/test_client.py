"""chat-client as people and scripts use it, against real gateways and Redis."""

from __future__ import annotations

import asyncio
import signal
import time

import pexpect
import pyte
import pytest

from tests.conftest import Cluster
from tests.support import BIN, GatewayProcess, T, clean_env, free_port, run_cli

pytestmark = pytest.mark.integration


async def client_cli(port: int, *args: str, stdin: bytes) -> tuple[int, str, str]:
    return await run_cli("chat-client", "--host", "127.0.0.1", "--port", str(port), *args,
                         stdin=stdin)  # fmt: skip


# -- pipe mode ------------------------------------------------------------------------------


async def test_pipe_sends_lines_prints_server_lines_and_quits(cluster: Cluster) -> None:
    """In a pipe, each stdin line is sent, each server line printed unchanged, and the
    client leaves (after the room has answered) and exits 0."""
    await cluster.start(2)
    watcher = await cluster.user(1, "watcher")
    status, out, err = await client_cli(
        cluster.gateways[0].port, "--name", "bot", stdin=b"hello\n/who\nsecond line\n"
    )
    assert status == 0, err
    lines = out.splitlines()
    assert lines[:2] == [
        "* Choose a name:",
        "* Welcome, bot! 2 users online. Type /help for commands, sair or /quit to leave.",
    ]
    assert lines[-1] == "* Goodbye, bot!"
    # The user list comes straight from the gateway, the echoes through the room: the list
    # may come before, between or after them, in one piece, and all before the goodbye.
    who = lines.index("* 2 users online:")
    assert lines[who : who + 3] == ["* 2 users online:", "*   bot", "*   watcher"]
    assert lines[2:who] + lines[who + 3 : -1] == ["bot: hello", "bot: second line"]
    assert await watcher.expect("* bot left the chat") == [
        "* bot joined the chat",
        "bot: hello",
        "bot: second line",
        "* bot left the chat",
    ]


async def test_pipe_without_name_uses_first_line(cluster: Cluster) -> None:
    """Without --name, the first line of input is the name."""
    await cluster.start(1)
    status, out, err = await client_cli(cluster.gateways[0].port, stdin=b"Ana\nol\xc3\xa1\n")
    assert status == 0, err
    assert "ana" not in out
    assert out.splitlines()[1].startswith("* Welcome, Ana!")
    assert "Ana: olá" in out.splitlines()


async def test_pipe_refused_name_exits_3_with_reason(cluster: Cluster) -> None:
    """A taken name in a pipe: the reason on stderr and exit status 3."""
    await cluster.start(1)
    await cluster.user(0, "taken")
    status, _, err = await client_cli(cluster.gateways[0].port, "--name", "TAKEN", stdin=b"x\n")
    assert status == 3
    assert err.strip() == "chat-client: name refused: the name TAKEN is taken; choose another"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "127.0.0.1", "--port", "{free}"], "connection refused by 127.0.0.1:"),
        (["--host", "no-such-host.invalid"], "cannot find host 'no-such-host.invalid'"),
        (["--port", "70000"], "Invalid value for '--port'"),
        (["--port", "http"], "Invalid value for '--port'"),
    ],
)
async def test_unreachable_or_bad_arguments_one_line(args: list[str], message: str) -> None:
    """Refused connections, unknown hosts and bad ports: one line, non-zero, no traceback."""
    args = [a.replace("{free}", str(free_port())) for a in args]
    status, out, err = await run_cli("chat-client", *args, "--name", "x", stdin=b"hi\n")
    assert status != 0
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("chat-client: ")
    assert message in err


async def test_pipe_reconnects_under_same_name_after_gateway_restart(cluster: Cluster) -> None:
    """The gateway is killed and restarted on the same port: the client says so, comes back
    under the same name by itself, and what it is given afterwards is delivered."""
    gateway_port = free_port()
    await cluster.start(1)
    restartable = GatewayProcess("gw-r", cluster.redis.url)
    await restartable.start(gateway_port)
    cluster.gateways.append(restartable)
    watcher = await cluster.user(0, "watcher")
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "chat-client"), "--host", "127.0.0.1", "--port", str(gateway_port),
        "--name", "phoenix", env=clean_env(), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stderr is not None and proc.stdout is not None
    try:
        await watcher.expect("* phoenix joined the chat")
        async with asyncio.timeout(T):
            while not (await proc.stdout.readline()).startswith(b"* Welcome, phoenix!"):
                pass
        restartable.signal(signal.SIGKILL)
        await restartable.wait(T)
        async with asyncio.timeout(T):
            while b"lost" not in await proc.stderr.readline():
                pass
        await restartable.start(gateway_port)  # same id: waits out the dead run's liveness
        # The dead run's user is reaped, then the client logs in again by itself.
        await watcher.expect("* phoenix left the chat", timeout=15)
        await watcher.expect("* phoenix joined the chat", timeout=6 * T)
        news: list[bytes] = []
        async with asyncio.timeout(2 * T):
            while b"back in the chat as phoenix" not in (line := await proc.stderr.readline()):
                news.append(line)
                assert line, b"".join(news)
        proc.stdin.write(b"I am back\n")
        await proc.stdin.drain()
        assert await watcher.readline() == "phoenix: I am back"
        proc.stdin.close()
        async with asyncio.timeout(2 * T):
            assert await proc.wait() == 0
        assert await watcher.readline() == "* phoenix left the chat"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- interactive mode -----------------------------------------------------------------------


class Terminal:
    """chat-client on a pseudo-terminal, its screen rendered by a VT100 emulator."""

    def __init__(self, port: int, name: str) -> None:
        self.screen = pyte.Screen(80, 24)
        self.stream = pyte.ByteStream(self.screen)
        env = clean_env(TERM="xterm", LANG="C.UTF-8", LC_ALL="C.UTF-8")
        self.child = pexpect.spawn(
            str(BIN / "chat-client"),
            ["--host", "127.0.0.1", "--port", str(port), "--name", name],
            env=env, dimensions=(24, 80),
        )  # fmt: skip

    def _pump(self, timeout: float) -> None:
        try:
            data = self.child.read_nonblocking(65536, timeout=timeout)
        except pexpect.TIMEOUT:
            return
        except pexpect.EOF:
            return
        self.stream.feed(data)

    async def wait_for(
        self, text: str, timeout: float = 2 * T, cursor_line: str | None = None
    ) -> list[str]:
        """Read the terminal until ``text`` is on the screen (and, if given, the cursor's
        line reads ``cursor_line``: the terminal has settled); return the screen lines."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line.rstrip() for line in self.screen.display]
            if any(text in line for line in lines) and (
                cursor_line is None or self.cursor_line() == cursor_line
            ):
                return lines
            if time.monotonic() > deadline or (not self.child.isalive() and not self._pending()):
                raise AssertionError(f"{text!r} never appeared:\n" + "\n".join(lines))
            await asyncio.to_thread(self._pump, 0.1)

    def _pending(self) -> bool:
        try:
            self.stream.feed(self.child.read_nonblocking(65536, timeout=0))
            return True
        except (pexpect.TIMEOUT, pexpect.EOF):
            return False

    def type(self, keys: str) -> None:
        self.child.send(keys)

    def cursor_line(self) -> str:
        return self.screen.display[self.screen.cursor.y].rstrip()

    async def exit_status(self) -> int:
        deadline = time.monotonic() + 2 * T
        while self.child.isalive() and time.monotonic() < deadline:
            await asyncio.to_thread(self._pump, 0.1)
        self.child.close()
        status: int = self.child.exitstatus if self.child.exitstatus is not None else -1
        return status

    def kill(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def terminals() -> list[Terminal]:
    opened: list[Terminal] = []
    yield opened  # type: ignore[misc]
    for t in opened:
        t.kill()


async def test_incoming_message_does_not_garble_typing(
    cluster: Cluster, terminals: list[Terminal]
) -> None:
    """A message arriving while the user types prints above the input line; the
    half-typed line stays intact and is sent whole on Enter."""
    await cluster.start(2)
    bob = await cluster.user(1, "bob")
    term = Terminal(cluster.gateways[0].port, "alice")
    terminals.append(term)
    await term.wait_for("Welcome, alice!")
    await bob.expect("* alice joined the chat")
    term.type("hello wor")
    await term.wait_for("alice #lobby> hello wor")
    await bob.send("incoming while you type")
    lines = await term.wait_for(
        "bob: incoming while you type", cursor_line="alice #lobby> hello wor"
    )
    incoming = next(i for i, line in enumerate(lines) if "bob: incoming" in line)
    assert incoming < term.screen.cursor.y
    assert "hello wor" not in lines[incoming]
    term.type("ld\r")
    assert await bob.expect(lambda line: line.startswith("alice: ")) == [
        "bob: incoming while you type",
        "alice: hello world",
    ]
    lines = await term.wait_for("alice: hello world")
    assert any(line.endswith("alice: hello world") for line in lines)


@pytest.mark.parametrize("keys", ["\x04", "\x03", "sair\r", "/quit\r"])
async def test_interactive_leaves_cleanly(
    cluster: Cluster, terminals: list[Terminal], keys: str
) -> None:
    """Ctrl-D, Ctrl-C, sair and /quit all leave cleanly: exit 0, others see the leave."""
    await cluster.start(1)
    bob = await cluster.user(0, "bob")
    term = Terminal(cluster.gateways[0].port, "alice")
    terminals.append(term)
    await term.wait_for("Welcome, alice!")
    await bob.expect("* alice joined the chat")
    term.type(keys)
    assert await term.exit_status() == 0
    assert await bob.readline() == "* alice left the chat"
    assert "Traceback" not in "\n".join(term.screen.display)


async def test_interactive_asks_for_a_name_and_again_when_taken(
    cluster: Cluster, terminals: list[Terminal]
) -> None:
    """Without --name the client asks; a taken name shows the server's reason and asks
    again."""
    await cluster.start(1)
    await cluster.user(0, "bob")
    env = clean_env(TERM="xterm", LANG="C.UTF-8", LC_ALL="C.UTF-8")
    term = Terminal.__new__(Terminal)
    term.screen = pyte.Screen(80, 24)
    term.stream = pyte.ByteStream(term.screen)
    term.child = pexpect.spawn(
        str(BIN / "chat-client"), ["--host", "127.0.0.1", "--port", str(cluster.gateways[0].port)],
        env=env, dimensions=(24, 80),
    )  # fmt: skip
    terminals.append(term)
    await term.wait_for("Your name:")
    term.type("BOB\r")
    await term.wait_for("the name BOB is taken")
    await term.wait_for("Your name:")
    term.type("carol\r")
    await term.wait_for("Welcome, carol!")


async def test_interactive_prompt_names_the_room_and_private_lines_stand_out(
    cluster: Cluster, terminals: list[Terminal]
) -> None:
    """/join changes the prompt to `NAME #ROOM> `; a private message arrives marked as
    private; /help lists the room and private commands."""
    await cluster.start(2)
    bob = await cluster.user(1, "bob")
    term = Terminal(cluster.gateways[0].port, "alice")
    terminals.append(term)
    await term.wait_for("Welcome, alice!")
    await bob.expect("* alice joined the chat")
    term.type("/join #math\r")
    await term.wait_for("You are in #math now", cursor_line="alice #math>")
    await bob.expect("* alice left for #math")
    await bob.send("/msg alice a secret")
    assert await bob.readline() == "(private to alice) bob: a secret"
    lines = await term.wait_for("a secret")
    assert any(line.endswith("(private)  bob: a secret") for line in lines), lines
    term.type("/help\r")
    lines = await term.wait_for("/msg NAME TEXT")
    assert any("/join #ROOM" in line for line in lines)
    term.type("/part\r")
    await term.wait_for("You are in #lobby now", cursor_line="alice #lobby>")


async def test_a_reconnecting_client_goes_back_to_its_room(cluster: Cluster) -> None:
    """A pipe client in #math whose gateway restarts logs in again and rejoins #math, as a
    user of #math on another gateway sees."""
    await cluster.start(2)
    watcher = await cluster.user(1, "watcher")
    await watcher.send("/join #math")
    await watcher.expect(lambda line: line.startswith("* You are in #math"))
    gateway = cluster.gateways[0]
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "chat-client"), "--host", "127.0.0.1", "--port", str(gateway.port),
        "--name", "ana",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"/join #math\n")
    await proc.stdin.drain()
    assert await watcher.readline() == "* ana joined #math"
    async with asyncio.timeout(T):  # the client knows where it is before the gateway stops
        while not (await proc.stdout.readline()).startswith(b"* You are in #math now"):
            pass
    await gateway.stop()
    assert await watcher.readline() == "* ana left the chat"
    await gateway.start(port=gateway.port)
    assert await watcher.readline(timeout=6 * T) == "* ana joined #math"
    proc.stdin.close()
    async with asyncio.timeout(4 * T):
        assert await proc.wait() == 0
