"""ChatSession against a real gateway running in this process on the embedded broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from broker import RedisBroker
from client.errors import ConnectFailed, NameRefused
from client.protocol import ServerLine
from client.session import Backoff, ChatSession
from gateway.config import GatewayConfig
from gateway.server import Gateway
from tests.support import ChatClient, T, free_port, port_of

Want = str | Callable[[str], bool]


class FakeUI:
    """The session's UI, driven by the test: input lines and names go in through queues,
    everything the session shows or reports is logged as (kind, text) in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.inputs: asyncio.Queue[str | None] = asyncio.Queue()
        self.names: asyncio.Queue[str | None] = asyncio.Queue()
        self._changed = asyncio.Event()

    # -- the UI protocol -----------------------------------------------------------------

    def show(self, line: ServerLine) -> None:
        self._record("show", line.raw)

    def status(self, text: str) -> None:
        self._record("status", text)

    def joined(self, name: str) -> None:
        self._record("joined", name)

    async def ask_name(self) -> str | None:
        self._record("ask_name", "")
        return await self.names.get()

    async def read_input(self) -> str | None:
        return await self.inputs.get()

    # -- for the test --------------------------------------------------------------------

    def type(self, *lines: str) -> None:
        for line in lines:
            self.inputs.put_nowait(line)

    def end_input(self) -> None:
        self.inputs.put_nowait(None)

    def of(self, kind: str) -> list[str]:
        return [text for k, text in self.log if k == kind]

    def index(self, kind: str, want: Want, start: int = 0) -> int | None:
        for i in range(start, len(self.log)):
            k, text = self.log[i]
            if k == kind and (text == want if isinstance(want, str) else want(text)):
                return i
        return None

    async def wait_for(self, kind: str, want: Want, start: int = 0, timeout: float = T) -> int:
        """The index in the log of the first (kind, text) at or after ``start`` matching."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._changed.clear()
                    if (i := self.index(kind, want, start)) is not None:
                        return i
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {kind} {want!r} after #{start} in {self.log}") from None

    def _record(self, kind: str, text: str) -> None:
        self.log.append((kind, text))
        self._changed.set()


def contains(part: str) -> Callable[[str], bool]:
    return lambda text: part in text


def fast_backoff() -> Backoff:
    return Backoff(base=0.01, cap=0.05)


async def start_gateway(port: int = 0) -> Gateway:
    gateway = Gateway(GatewayConfig(host="127.0.0.1", port=port), RedisBroker.embedded())
    await gateway.start()
    return gateway


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    gw = await start_gateway()
    yield gw
    await gw.shutdown()


@pytest.fixture
async def clients() -> AsyncIterator[list[ChatClient]]:
    opened: list[ChatClient] = []
    yield opened
    await asyncio.gather(*(c.close() for c in opened))


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[[Coroutine[Any, Any, int]], asyncio.Task[int]]]:
    """Runs sessions as tasks; cancels those still running at the end of the test (before
    the gateways stop, since this fixture is set up after them)."""
    tasks: list[asyncio.Task[int]] = []

    def run(coro: Coroutine[Any, Any, int]) -> asyncio.Task[int]:
        task = asyncio.create_task(coro)
        tasks.append(task)
        return task

    yield run
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def user(port: int, name: str, clients: list[ChatClient]) -> ChatClient:
    """A raw line client logged in as ``name``."""
    client = await ChatClient.connect(port)
    clients.append(client)
    await client.login(name)
    return client


def session(port: int, name: str | None, ui: FakeUI, *, interactive: bool) -> ChatSession:
    return ChatSession("127.0.0.1", port, name, ui, interactive=interactive,
                       backoff=fast_backoff())  # fmt: skip


async def finished(task: asyncio.Task[int], timeout: float = T) -> int:
    async with asyncio.timeout(timeout):
        return await task


# --- login and relay ----------------------------------------------------------------------


async def test_login_with_a_name_and_relay_both_ways(
    gateway: Gateway, clients: list[ChatClient], spawn: Any
) -> None:
    """With a name the session logs in at once; its lines reach others and theirs are shown."""
    port = port_of(gateway)
    bob = await user(port, "bob", clients)
    ui = FakeUI()
    task = spawn(session(port, "alice", ui, interactive=True).run())

    await ui.wait_for("joined", "alice")
    assert ui.log[:3] == [
        ("show", "* Choose a name:"),
        ("show", "* Welcome, alice! 2 users online. Type /help for commands, sair or /quit "
                 "to leave."),
        ("joined", "alice"),
    ]  # fmt: skip
    assert ui.of("ask_name") == []
    assert await bob.expect("* alice joined the chat") == ["* alice joined the chat"]

    ui.type("hello bob")
    assert await bob.expect("alice: hello bob") == ["alice: hello bob"]
    await ui.wait_for("show", "alice: hello bob")

    await bob.send("hi alice")
    await ui.wait_for("show", "bob: hi alice")
    assert not task.done()
    assert ui.of("status") == []


async def test_commands_are_relayed_and_answered(
    gateway: Gateway, clients: list[ChatClient], spawn: Any
) -> None:
    """/who typed by the user goes to the gateway and its answer is shown."""
    port = port_of(gateway)
    await user(port, "bob", clients)
    ui = FakeUI()
    spawn(session(port, "alice", ui, interactive=True).run())
    await ui.wait_for("joined", "alice")
    ui.type("/who")
    header = await ui.wait_for("show", "* 2 users online:")
    await ui.wait_for("show", "*   bob", start=header)
    assert ui.log[header + 1 : header + 3] == [("show", "*   alice"), ("show", "*   bob")]


async def test_sair_quits_with_the_servers_goodbye(
    gateway: Gateway, clients: list[ChatClient], spawn: Any
) -> None:
    """Typing 'sair' leaves: the goodbye is shown, others see the leave, run() returns 0."""
    port = port_of(gateway)
    bob = await user(port, "bob", clients)
    ui = FakeUI()
    task = spawn(session(port, "alice", ui, interactive=True).run())
    await ui.wait_for("joined", "alice")
    ui.type("sair")
    assert await finished(task) == 0
    assert ui.log[-1] == ("show", "* Goodbye, alice!")
    assert (await bob.expect("* alice left the chat"))[-1] == "* alice left the chat"
    assert ui.of("status") == []


async def test_quit_with_words_after_it_ends_the_session(
    gateway: Gateway, clients: list[ChatClient], spawn: Any
) -> None:
    """'/quit now' makes the gateway say goodbye and close; the session must end there
    (run() returns 0) rather than take the close for a lost connection and log in again."""
    port = port_of(gateway)
    ui = FakeUI()
    task = spawn(session(port, "alice", ui, interactive=True).run())
    await ui.wait_for("joined", "alice")
    ui.type("/quit now")
    await ui.wait_for("show", "* Goodbye, alice!")
    lost = asyncio.create_task(ui.wait_for("status", contains("lost")))
    try:
        done, _ = await asyncio.wait({task, lost}, timeout=T, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
    assert task in done, f"the session went on after the goodbye: {ui.log}"
    assert task.result() == 0


async def test_interactive_without_name_asks_and_asks_again_when_taken(
    gateway: Gateway, clients: list[ChatClient], spawn: Any
) -> None:
    """Interactive and nameless: the UI is asked for a name, and asked again after a
    refusal; the accepted name is reported through joined()."""
    port = port_of(gateway)
    await user(port, "carol", clients)
    ui = FakeUI()
    task = spawn(session(port, None, ui, interactive=True).run())

    await ui.wait_for("ask_name", "")
    ui.names.put_nowait("CAROL")
    refusal = await ui.wait_for("show", "! the name CAROL is taken; choose another")
    await ui.wait_for("ask_name", "", start=refusal)
    assert ui.log[refusal + 1] == ("show", "* Choose a name:")
    ui.names.put_nowait("dave")
    await ui.wait_for("joined", "dave")
    assert len(ui.of("ask_name")) == 2
    assert not task.done()


async def test_interactive_giving_no_name_ends_the_session(gateway: Gateway, spawn: Any) -> None:
    """When the user gives up at the name question, run() returns 0 without joining."""
    ui = FakeUI()
    task = spawn(session(port_of(gateway), None, ui, interactive=True).run())
    await ui.wait_for("ask_name", "")
    ui.names.put_nowait(None)
    assert await finished(task) == 0
    assert ui.of("joined") == []


async def test_pipe_with_a_taken_name_raises_name_refused(
    gateway: Gateway, clients: list[ChatClient], spawn: Any
) -> None:
    """Not interactive, a refused name cannot be asked again: NameRefused with the reason."""
    port = port_of(gateway)
    await user(port, "bob", clients)
    ui = FakeUI()
    task = spawn(session(port, "BOB", ui, interactive=False).run())
    with pytest.raises(NameRefused) as info:
        await finished(task)
    assert str(info.value) == "the name BOB is taken; choose another"
    assert ui.of("ask_name") == []
    assert ui.of("joined") == []


async def test_connect_to_a_closed_port_raises_connect_failed() -> None:
    """Nothing listening: run() raises ConnectFailed naming the address."""
    port = free_port()
    ui = FakeUI()
    with pytest.raises(ConnectFailed) as info:
        await finished(asyncio.create_task(session(port, "alice", ui, interactive=False).run()))
    assert f"127.0.0.1:{port}" in str(info.value)
    assert ui.log == []


# --- end of input -------------------------------------------------------------------------


async def test_pipe_end_of_input_quits_after_the_last_echo(
    gateway: Gateway, clients: list[ChatClient], spawn: Any
) -> None:
    """In a pipe, end of input sends /quit only once the room echoed the last message: the
    echo is shown before the goodbye, others get every line, and run() returns 0."""
    port = port_of(gateway)
    bob = await user(port, "bob", clients)
    ui = FakeUI()
    task = spawn(session(port, "bot", ui, interactive=False).run())
    await ui.wait_for("joined", "bot")
    ui.type("first", "last")
    ui.end_input()
    assert await finished(task) == 0
    shown = ui.of("show")
    assert shown[-3:] == ["bot: first", "bot: last", "* Goodbye, bot!"]
    assert await bob.expect("* bot left the chat") == [
        "* bot joined the chat",
        "bot: first",
        "bot: last",
        "* bot left the chat",
    ]


async def test_pipe_end_of_input_waits_for_the_user_list(
    gateway: Gateway, clients: list[ChatClient], spawn: Any
) -> None:
    """A /who as the last line of a pipe is answered in full before the goodbye."""
    port = port_of(gateway)
    await user(port, "bob", clients)
    ui = FakeUI()
    task = spawn(session(port, "bot", ui, interactive=False).run())
    await ui.wait_for("joined", "bot")
    ui.type("/who")
    ui.end_input()
    assert await finished(task) == 0
    assert ui.of("show")[-4:] == ["* 2 users online:", "*   bob", "*   bot", "* Goodbye, bot!"]


async def test_pipe_end_of_input_with_nothing_sent_quits(gateway: Gateway, spawn: Any) -> None:
    """A pipe whose input is empty logs in, says goodbye and returns 0."""
    ui = FakeUI()
    ui.end_input()
    task = spawn(session(port_of(gateway), "bot", ui, interactive=False).run())
    assert await finished(task) == 0
    assert ui.of("show")[-1] == "* Goodbye, bot!"
    assert ui.of("joined") == ["bot"]


async def test_interactive_end_of_input_quits_at_once(
    gateway: Gateway, clients: list[ChatClient], spawn: Any
) -> None:
    """At a terminal, end of input quits without waiting for the room: the goodbye comes
    before the echo of the line typed just before, and run() returns 0."""
    port = port_of(gateway)
    bob = await user(port, "bob", clients)
    ui = FakeUI()
    task = spawn(session(port, "alice", ui, interactive=True).run())
    await ui.wait_for("joined", "alice")
    ui.type("bye all")
    ui.end_input()
    assert await finished(task) == 0
    shown = ui.of("show")
    assert shown[-1] == "* Goodbye, alice!"
    assert "alice: bye all" not in shown
    # The line itself was sent, before the quit.
    assert (await bob.expect("* alice left the chat"))[-2:] == [
        "alice: bye all",
        "* alice left the chat",
    ]


# --- reconnection -------------------------------------------------------------------------


async def test_reconnects_under_the_same_name_and_delivers_lines_typed_meanwhile(
    clients: list[ChatClient], spawn: Any
) -> None:
    """When its gateway restarts, the session logs in again under the same name, says it
    is back, and sends what was typed while it was disconnected."""
    port = free_port()
    first = await start_gateway(port)
    second: Gateway | None = None
    try:
        ui = FakeUI()
        task = spawn(session(port, "alice", ui, interactive=True).run())
        await ui.wait_for("joined", "alice")

        await first.shutdown()
        restart = await ui.wait_for("show", "* Server restarting: please reconnect.")
        lost = await ui.wait_for("status", f"connection to 127.0.0.1:{port} lost", start=restart)
        ui.type("typed while away", "and again")

        second = await start_gateway(port)
        back = await ui.wait_for("status", "back in the chat as alice", start=lost)
        assert ui.of("joined") == ["alice", "alice"]
        assert ui.log[back - 1] == (
            "show",
            "* Welcome, alice! 1 user online. Type /help for commands, sair or /quit to leave.",
        )
        assert ui.log[back - 2] == ("show", "* Choose a name:")
        echo = await ui.wait_for("show", "alice: typed while away", start=back)
        await ui.wait_for("show", "alice: and again", start=echo)

        # The new connection relays both ways.
        bob = await user(port, "bob", clients)
        await ui.wait_for("show", "* bob joined the chat", start=back)
        ui.type("welcome back bob")
        seen = await bob.expect("alice: welcome back bob")
        # bob joined after alice's two lines, so he is shown them first, marked as history.
        assert [line.split("] ", 1)[-1] for line in seen] == [
            "alice: typed while away",
            "alice: and again",
            "alice: welcome back bob",
        ]
        assert all(line.startswith("* [history ") for line in seen[:2])
        await bob.send("hi alice")
        await ui.wait_for("show", "bob: hi alice", start=back)

        ui.type("sair")
        assert await finished(task) == 0
    finally:
        await first.shutdown()
        if second is not None:
            await second.shutdown()


async def test_reconnect_keeps_retrying_while_the_port_is_closed(spawn: Any) -> None:
    """While nothing listens, the session reports each failed attempt and tries again; it
    gets in as soon as a gateway is back."""
    port = free_port()
    first = await start_gateway(port)
    second: Gateway | None = None
    try:
        ui = FakeUI()
        spawn(session(port, "alice", ui, interactive=False).run())
        await ui.wait_for("joined", "alice")
        await first.shutdown()
        lost = await ui.wait_for("status", contains("lost"))
        refused = await ui.wait_for("status", contains("connection refused"), start=lost)
        await ui.wait_for("status", contains("connection refused"), start=refused + 1)
        attempts = [s for s in ui.of("status") if s.startswith("reconnecting in ")]
        assert len(attempts) >= 2
        second = await start_gateway(port)
        await ui.wait_for("status", "back in the chat as alice", start=lost)
    finally:
        await first.shutdown()
        if second is not None:
            await second.shutdown()


async def test_reconnect_gives_up_after_the_limit(spawn: Any) -> None:
    """With no gateway coming back, reconnecting stops after give_up_after with
    ConnectFailed."""
    port = free_port()
    gw = await start_gateway(port)
    try:
        ui = FakeUI()
        chat = ChatSession("127.0.0.1", port, "alice", ui, interactive=True,
                           give_up_after=0.2, backoff=fast_backoff())  # fmt: skip
        task = spawn(chat.run())
        await ui.wait_for("joined", "alice")
    finally:
        await gw.shutdown()
    with pytest.raises(ConnectFailed, match="gave up reconnecting"):
        await finished(task)
    assert ui.index("status", contains("lost")) is not None


async def test_interactive_end_of_input_while_disconnected_ends_the_session(
    spawn: Any,
) -> None:
    """A user who leaves while the session is reconnecting ends it: run() returns 0."""
    port = free_port()
    gw = await start_gateway(port)
    try:
        ui = FakeUI()
        task = spawn(session(port, "alice", ui, interactive=True).run())
        await ui.wait_for("joined", "alice")
    finally:
        await gw.shutdown()
    await ui.wait_for("status", contains("lost"))
    ui.end_input()
    assert await finished(task) == 0
    assert ui.of("joined") == ["alice"]
