"""Batching under load (gateway.batching): a busy room's lines and a busy gateway's
messages to Redis wait up to a window to go out together; a room of people never waits,
and nothing is reordered, lost or given to someone it was not for."""

from __future__ import annotations

import asyncio
import itertools
import time
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from broker import ChatMessage
from broker.events import encode_message
from chatwire.texts import chat_line, joined_text, notice_line
from gateway import cli as gateway_cli
from gateway import rooms as rooms_module
from gateway.batching import BUSY_RATE, RATE_PERIOD, Pacer
from gateway.config import GatewayConfig
from gateway.metrics import Counts
from gateway.publisher import MAX_BATCH, Publisher
from gateway.rooms import Room
from tests.support import T, Timers
from tests.test_room import FakeMember, enter, joined, left

WINDOW = 0.02


class Clock:
    """``time.monotonic()`` as a test sets it (and the wall clock, as it is)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "rate"),
    [
        ([], {}, BUSY_RATE),
        ([], {"CHAT_BATCH_RATE": "100"}, 100.0),
        (["--batch-rate", "50.5"], {"CHAT_BATCH_RATE": "100"}, 50.5),  # the flag wins
    ],
)
def test_the_batch_rate_comes_from_its_flag_or_environment_variable(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], rate: float
) -> None:
    started: list[GatewayConfig] = []

    async def serve(config: GatewayConfig) -> None:
        started.append(config)

    monkeypatch.setattr(gateway_cli, "serve", serve)
    monkeypatch.setattr(gateway_cli, "configure_logging", lambda *_: None)
    monkeypatch.delenv("CHAT_BATCH_RATE", raising=False)
    result = CliRunner().invoke(gateway_cli.main, args, env=env)
    assert result.exit_code == 0, result.output
    assert [config.batch_rate for config in started] == [rate]


@pytest.mark.parametrize("value", ["0", "-5", "fast"])
def test_a_batch_rate_that_is_no_rate_is_refused_in_one_line(value: str) -> None:
    result = CliRunner().invoke(gateway_cli.main, [], env={"CHAT_BATCH_RATE": value})
    assert result.exit_code == 2
    assert "Invalid value for '--batch-rate'" in result.output
    assert "Traceback" not in result.output


# -- the pacer -----------------------------------------------------------------------------


def test_a_stream_under_the_busy_rate_goes_out_at_once() -> None:
    """At the busy rate or below, output is never held, however close together."""
    pacer = Pacer(WINDOW)
    per_period = int(BUSY_RATE * RATE_PERIOD)  # exactly the busy rate
    now = 0.0
    for _ in range(5):
        for _ in range(per_period):
            pacer.arrived(1, now)
            assert pacer.due(now) == now
            pacer.sent(now)
            now += RATE_PERIOD / per_period
    assert not pacer.busy


def test_a_busy_stream_goes_out_at_most_once_per_window_the_first_at_once() -> None:
    pacer = Pacer(WINDOW)
    pacer.arrived(1, 0.0)  # the first starts the clock
    pacer.arrived(int(BUSY_RATE * RATE_PERIOD) + 1, RATE_PERIOD)  # one over the rate
    assert pacer.busy
    assert pacer.due(RATE_PERIOD) == RATE_PERIOD  # nothing went out lately: at once
    pacer.sent(RATE_PERIOD)
    assert pacer.due(RATE_PERIOD + 0.001) == pytest.approx(RATE_PERIOD + WINDOW)
    assert pacer.due(RATE_PERIOD + WINDOW + 0.005) == RATE_PERIOD + WINDOW + 0.005


@pytest.mark.parametrize("rate", [50.0, 2000.0])
def test_a_pacer_is_busy_over_its_own_rate(rate: float) -> None:
    """``--batch-rate``: the line is the pacer's rate, whatever the default."""
    for messages, busy in ((int(rate * RATE_PERIOD), False), (int(rate * RATE_PERIOD) + 1, True)):
        pacer = Pacer(WINDOW, rate)
        pacer.arrived(1, 0.0)
        pacer.arrived(messages, RATE_PERIOD)
        assert pacer.busy is busy, (messages, rate)


def test_a_quiet_spell_ends_the_pacing() -> None:
    """The rate is over the time since the period began: a burst long ago is no rate."""
    pacer = Pacer(WINDOW)
    pacer.arrived(1, 0.0)
    pacer.arrived(1000, RATE_PERIOD)
    assert pacer.busy
    pacer.sent(RATE_PERIOD)
    pacer.arrived(1, 5.0)  # 1 message in nearly five seconds
    assert not pacer.busy
    assert pacer.due(5.0) == 5.0


@pytest.mark.parametrize("window", [0.01, 0.05, 0.1, 0.3])
def test_paced_output_stays_paced_at_the_same_rate(window: float) -> None:
    """Paced output comes in lumps a window apart: the rate read from them is the rate
    that came in, whatever the window, so pacing does not switch itself off."""
    pacer = Pacer(window)
    rate = 2 * BUSY_RATE
    pacer.arrived(1, 0.0)
    pacer.arrived(int(rate * RATE_PERIOD), RATE_PERIOD)
    now, lumps = RATE_PERIOD, 0
    while now < 2:  # two seconds of lumps
        now = pacer.due(now)
        pacer.arrived(round(rate * window), now)
        pacer.sent(now)
        assert pacer.busy
        lumps += 1
    assert lumps <= 2 / window + 2  # a window apart


def test_pacing_ends_under_half_the_busy_rate_not_before() -> None:
    pacer = Pacer(WINDOW)
    pacer.arrived(1, 0.0)
    pacer.arrived(int(BUSY_RATE * RATE_PERIOD) + 1, RATE_PERIOD)
    assert pacer.busy
    pacer.arrived(int(0.6 * BUSY_RATE * RATE_PERIOD), 2 * RATE_PERIOD)
    assert pacer.busy  # 60 % of the rate: still paced
    pacer.arrived(int(0.4 * BUSY_RATE * RATE_PERIOD), 3 * RATE_PERIOD)
    assert not pacer.busy
    pacer.arrived(int(0.6 * BUSY_RATE * RATE_PERIOD), 4 * RATE_PERIOD)
    assert not pacer.busy  # and not again until over the rate itself


def test_no_window_never_holds_anything() -> None:
    pacer = Pacer(0.0)
    pacer.arrived(1, 0.0)
    pacer.arrived(100_000, RATE_PERIOD)
    assert pacer.busy
    pacer.sent(RATE_PERIOD)
    assert pacer.due(RATE_PERIOD) == RATE_PERIOD


# -- a room's fan-out ----------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(rooms_module, "time", SimpleNamespace(monotonic=clock.monotonic,
                                                              time=clock.time))  # fmt: skip
    return clock


def busy_room(
    clock: Clock, timers: Timers, *names: str, window: float = WINDOW, notice_limit: int = 0
) -> tuple[Room, list[FakeMember], Counts]:
    """A room of ``names`` that has just carried more than the busy rate for a period,
    its members' outputs cleared and its counts fresh."""
    counts = Counts()
    room = Room("#lobby", notice_limit, counts, batch_window=window)
    members = [FakeMember(name) for name in names]
    for n, member in enumerate(members):
        enter(room, member, f"1-{n}")
    room.deliver_batch([ChatMessage("2-0", "bot", "the clock starts")])
    clock.now += RATE_PERIOD
    burst = int(BUSY_RATE * RATE_PERIOD) + 1
    room.deliver_batch([ChatMessage(f"3-{n}", "bot", f"burst {n}") for n in range(burst)])
    assert room._pacer.busy
    clock.now += WINDOW + 0.001
    timers.fire()
    for member in members:
        member.written.clear()
    counts.deliveries = counts.batches_delayed = 0
    return room, members, counts


def now_and_waiting(room: Room, clock: Clock, waiting: str) -> None:
    """In a busy room: a line written at once (the last window is over), then one that
    waits for the next."""
    room.deliver_batch([ChatMessage("4-0", "bot", "now")])
    clock.now += 0.001
    room.deliver_batch([ChatMessage("4-1", "bot", waiting)])


async def test_a_room_of_people_writes_every_line_at_once(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the busy rate, each batch is written as it comes: no timer, nothing held."""
    timers = Timers(monkeypatch)
    counts = Counts()
    room = Room("#lobby", counts=counts, batch_window=WINDOW)
    a, b = FakeMember("a"), FakeMember("b")
    enter(room, a, "1-0")
    enter(room, b, "1-1")
    a.written.clear()
    for n in range(50):  # 100 messages a second, for half a second
        room.deliver_batch([ChatMessage(f"2-{n}", "ana", f"line {n}")])
        assert a.written[-1] == chat_line("ana", f"line {n}")
        clock.now += 0.01
    assert len(a.written) == 50
    assert timers.pending() == []
    assert counts.batches_delayed == 0
    assert counts.deliveries == 50 * 2


@pytest.mark.parametrize(("batch_rate", "batched"), [(BUSY_RATE, False), (100.0, True)])
async def test_a_room_is_busy_over_the_gateways_batch_rate(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, batch_rate: float, batched: bool
) -> None:
    """300 messages a second, the fixed benchmark's room: written line by line under the
    default rate; over a lower ``--batch-rate``, in batches a window apart (after the
    period that finds it busy), every line still written once and in order."""
    timers = Timers(monkeypatch)
    counts = Counts()
    room = Room("#lobby", counts=counts, batch_window=WINDOW, batch_rate=batch_rate)
    a = FakeMember("a")
    enter(room, a, "1-0")
    a.written.clear()
    for n in range(150):  # half a second
        room.deliver_batch([ChatMessage(f"2-{n}", "ana", f"line {n}")])
        clock.now += 1 / 300
        if timers.pending() and clock.now >= room._pacer._last_out + WINDOW:
            timers.fire()
    timers.fire()
    assert b"".join(a.written) == b"".join(chat_line("ana", f"line {n}") for n in range(150))
    assert counts.deliveries == 150
    if batched:
        # Line by line for the first period (30 lines), then about one write per window.
        assert len(a.written) <= 30 + 0.4 / WINDOW + 2, len(a.written)
        assert counts.batches_delayed > 0
    else:
        assert len(a.written) == 150
        assert counts.batches_delayed == 0


async def test_a_busy_room_writes_what_came_in_a_window_in_one_write(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the busy rate, lines coming within a window of the last write wait for its
    end and then go to each member in one write, in order, counted once."""
    timers = Timers(monkeypatch)
    room, (a, b), counts = busy_room(clock, timers, "a", "b")
    room.deliver_batch([ChatMessage("4-0", "bot", "first")])  # the window is over: at once
    assert a.written == [chat_line("bot", "first")]
    clock.now += 0.005
    room.deliver_batch([ChatMessage("4-1", "bot", "second")])
    clock.now += 0.005
    room.deliver_batch([ChatMessage("4-2", "bot", "third"), ChatMessage("4-3", "bot", "4th")])
    assert a.written == [chat_line("bot", "first")]  # the rest waits
    assert [delay for delay, _, _ in timers.scheduled] == [pytest.approx(WINDOW - 0.005)]
    assert counts.batches_delayed == 1
    clock.now += WINDOW
    timers.fire()
    waited = chat_line("bot", "second") + chat_line("bot", "third") + chat_line("bot", "4th")
    assert a.written == [chat_line("bot", "first"), waited]
    assert b.written == a.written
    assert counts.deliveries == 4 * 2


async def test_a_busy_room_writes_what_waits_before_a_members_own_leave(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member moving on gets every line that came before its leave, then no more; the
    others get the lines, then the leave notice."""
    timers = Timers(monkeypatch)
    room, (a, b), _ = busy_room(clock, timers, "a", "b")
    now_and_waiting(room, clock, "before the leave")
    room.expect_leave(b)
    room.deliver_batch([left(b, "4-2"), ChatMessage("4-3", "bot", "after the leave")])
    assert b.output == chat_line("bot", "now") + chat_line("bot", "before the leave")
    clock.now += WINDOW
    timers.fire()
    assert b not in room.members()
    assert b.output == chat_line("bot", "now") + chat_line("bot", "before the leave")
    assert a.output == (
        chat_line("bot", "now")
        + chat_line("bot", "before the leave")
        + notice_line("b left the chat")
        + chat_line("bot", "after the leave")
    )


async def test_a_busy_room_does_not_give_a_newcomer_what_came_before_its_join(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    timers = Timers(monkeypatch)
    room, (a,), _ = busy_room(clock, timers, "a")
    now_and_waiting(room, clock, "before the join")
    newcomer = FakeMember("n")
    admitted = room.expect(newcomer)
    room.deliver_batch([joined(newcomer, "4-2"), ChatMessage("4-3", "bot", "after the join")])
    assert admitted.done()
    room.enter(newcomer, b"* history\n")
    clock.now += WINDOW
    timers.fire()
    assert newcomer.output == b"* history\n" + chat_line("bot", "after the join")
    assert a.output == (
        chat_line("bot", "now")
        + chat_line("bot", "before the join")
        + notice_line(joined_text("n"))
        + chat_line("bot", "after the join")
    )


async def test_a_room_past_its_notice_limit_keeps_the_order_of_joins_and_leaves_too(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where joins and leaves are summarised (no notice is written at the event), a
    member leaving still gets what came before its leave, and a newcomer nothing that
    came before its join."""
    timers = Timers(monkeypatch)
    room, (a, b, c), _ = busy_room(clock, timers, "a", "b", "c", notice_limit=1)
    now_and_waiting(room, clock, "before")
    room.expect_leave(b)
    newcomer = FakeMember("n")
    room.expect(newcomer)
    room.deliver_batch([left(b, "4-2"), joined(newcomer, "4-3")])
    room.enter(newcomer, b"")
    room.deliver_batch([ChatMessage("4-4", "bot", "after")])
    clock.now += WINDOW
    timers.fire()  # the window, then the summary
    assert b.output == chat_line("bot", "now") + chat_line("bot", "before")
    assert newcomer.output.startswith(chat_line("bot", "after"))
    assert a.output.startswith(
        chat_line("bot", "now") + chat_line("bot", "before") + chat_line("bot", "after")
    )
    assert c.output == a.output


async def test_a_gateway_notice_and_a_shutdown_come_after_what_waits(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    timers = Timers(monkeypatch)
    room, (a,), counts = busy_room(clock, timers, "a")
    now_and_waiting(room, clock, "waiting")
    room.notify_all("the gateway says")
    assert a.output == (
        chat_line("bot", "now") + chat_line("bot", "waiting") + notice_line("the gateway says")
    )
    clock.now += 0.001
    room.deliver_batch([ChatMessage("4-2", "bot", "last")])
    room.clear()
    assert a.output.endswith(chat_line("bot", "last"))
    assert timers.pending() == []
    assert counts.deliveries == 3


async def test_no_window_writes_a_busy_room_at_once(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    timers = Timers(monkeypatch)
    room, (a,), counts = busy_room(clock, timers, "a", window=0.0)
    for n in range(3):
        room.deliver_batch([ChatMessage(f"4-{n}", "bot", f"line {n}")])
        clock.now += 0.001
    assert len(a.written) == 3
    assert timers.pending() == [] and counts.batches_delayed == 0


# -- a gateway's publishing ----------------------------------------------------------------


class RecordingBroker:
    """Takes ``publish`` calls, noting when each came (loop time) and what it carried."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, list[str]]] = []

    async def publish(self, room: str, bodies: list[str]) -> list[str]:
        self.calls.append((time.monotonic(), list(bodies)))
        return [f"{n}-0" for n in range(len(bodies))]


class NotifyingBroker(RecordingBroker):
    """A :class:`RecordingBroker` that says when a call comes."""

    def __init__(self) -> None:
        super().__init__()
        self.called = asyncio.Event()

    async def publish(self, room: str, bodies: list[str]) -> list[str]:
        self.called.set()
        return await super().publish(room, bodies)

    async def next_call(self) -> tuple[float, list[str]]:
        self.called.clear()
        await self.called.wait()
        return self.calls[-1]


class Sender:
    id = "s"

    def __init__(self) -> None:
        self.published_count = 0

    def published(self, delivered: bool) -> None:
        self.published_count += delivered


async def feed(publisher: Publisher, sender: Sender, count: int, rate: float) -> None:
    """Queue ``count`` messages at ``rate`` a second (paced by the loop's clock)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n in range(count):
        publisher.message(sender, "#lobby", "bot", f"m{n}")
        await asyncio.sleep(max(0.0, start + (n + 1) / rate - loop.time()))


@pytest.mark.parametrize(
    ("window", "rate", "batch_rate"),
    [
        (0.05, 4 * BUSY_RATE, BUSY_RATE),
        (0.05, BUSY_RATE / 5, BUSY_RATE),
        (0.05, BUSY_RATE / 5, BUSY_RATE / 10),  # a lower --batch-rate
        (0.0, 4 * BUSY_RATE, BUSY_RATE),
    ],
)
async def test_a_busy_gateway_publishes_at_most_once_per_window(
    window: float, rate: float, batch_rate: float
) -> None:
    """A gateway sending more than its batch rate waits a window between script calls, each
    carrying what came meanwhile; under it, or with no window, every message goes at once.
    Every message goes out, once, in order."""
    broker = RecordingBroker()
    counts = Counts()
    publisher = Publisher(broker, "gw", counts, window, batch_rate)  # type: ignore[arg-type]
    worker = asyncio.create_task(publisher.run())
    sender = Sender()
    count = int(rate * 0.4)  # 0.4 s of it: long enough to be measured and paced
    try:
        async with asyncio.timeout(T):
            await feed(publisher, sender, count, rate)
            await publisher.drain()
    finally:
        worker.cancel()
    bodies = [body for _, batch in broker.calls for body in batch]
    assert bodies == [encode_message("bot", f"m{n}") for n in range(count)]
    assert sender.published_count == count
    if window and rate > batch_rate:
        # Busy after its first period: from then on calls are a window apart, each
        # carrying what came meanwhile.
        last = broker.calls[-5:]
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(last)]
        assert min(gaps) >= window * 0.9, gaps
        assert min(len(batch) for _, batch in last[:-1]) >= window * rate / 2
        assert counts.batches_delayed > 0
    else:
        assert counts.batches_delayed == 0
        assert count / len(broker.calls) < 4  # a message or two per call


class HeldReader:
    """A client whose input the publisher holds: notes when it is read again."""

    def __init__(self, broker: RecordingBroker) -> None:
        self.broker = broker
        self.read_before: list[int] = []  # calls made before each read_now()

    def read_now(self) -> None:
        self.read_before.append(len(self.broker.calls))


async def test_a_busy_gateway_reads_held_input_just_before_each_call() -> None:
    """Held readers are read (read_now) once, right before the next call and after its
    window; an idle gateway holds nobody."""
    broker = RecordingBroker()
    publisher = Publisher(broker, "gw", Counts(), batch_window=0.05)  # type: ignore[arg-type]
    reader = HeldReader(broker)
    assert not publisher.hold(reader)  # not busy: nothing held
    worker = asyncio.create_task(publisher.run())
    sender = Sender()
    try:
        async with asyncio.timeout(T):
            await feed(publisher, sender, int(4 * BUSY_RATE * 0.3), 4 * BUSY_RATE)
            assert publisher.hold(reader)
            calls = len(broker.calls)
            publisher.message(sender, "#lobby", "bot", "last")
            await publisher.drain()
    finally:
        worker.cancel()
    assert reader.read_before == [calls]  # read once, before the call that followed
    assert broker.calls[-1][1][-1] == encode_message("bot", "last")


@pytest.mark.parametrize("what", ["a full call", "one line"])
async def test_a_busy_gateway_holds_a_call_back_only_while_it_saves_something(
    what: str,
) -> None:
    """Between two calls of a busy gateway, a call's worth of lines (MAX_BATCH) ends the
    wait at once: the window saves calls, it does not cap what a gateway gets through.
    One line waits for the window."""
    window = 0.5
    broker = NotifyingBroker()
    publisher = Publisher(broker, "gw", Counts(), batch_window=window)  # type: ignore[arg-type]
    worker = asyncio.create_task(publisher.run())
    sender = Sender()
    try:
        async with asyncio.timeout(T):
            fed = int(4 * BUSY_RATE * 0.3)
            await feed(publisher, sender, fed, 4 * BUSY_RATE)  # busy from now on
            while sender.published_count < fed:
                await broker.next_call()
            # All out, just now: the next call is a window away.
            asked = time.monotonic()
            count = MAX_BATCH if what == "a full call" else 1
            for n in range(count):
                publisher.message(sender, "#lobby", "bot", f"late {n}")
            called, bodies = await broker.next_call()
    finally:
        worker.cancel()
    assert len(bodies) == count
    if what == "one line":
        assert called - asked > window * 0.8
    else:
        assert called - asked < window * 0.2
