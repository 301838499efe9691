"""A gateway SIGKILLed while its users are mid-conversation, under load: 300 users on 3
gateways, one killed, the rest keep chatting with no pause longer than 1 s."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from itertools import pairwise

import pytest

from tests.conftest import Cluster
from tests.load_support import (
    LOAD_FLAGS,
    LeanClient,
    MessageLog,
    close_all,
    log_in_all,
    log_lines,
    who_names,
)
from tests.support import T

pytestmark = pytest.mark.integration

GATEWAYS = 3
PER_GATEWAY = 100
SENDERS_PER_GATEWAY = 10
#: Seconds between one sender's messages: 30 senders, about 300 messages a second.
INTERVAL = 0.1
#: The kill comes at 3 s; its users are reaped about 6 s later: both happen under load.
KILL_AT = 3.0
SEND_SECONDS = 11.0
VICTIM = 1
MAX_GAP = 1.0
#: PROTOCOL.md 7: a killed gateway's users are announced as left within 15 s.
REAP_BOUND = 15.0


async def chatter(client: LeanClient, log: MessageLog, until: float, rng: random.Random) -> None:
    """Send a numbered message every INTERVAL until ``until`` or the connection ends."""
    next_at = time.monotonic() + rng.uniform(0, INTERVAL)
    while next_at < until and client.live:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # paces the load
        if client.say(log) is None:
            return
        next_at = max(next_at + INTERVAL, time.monotonic())


async def test_sigkilled_gateway_under_load(cluster: Cluster) -> None:
    """300 users on 3 gateways, one SIGKILLed mid-chat: the rest chat on, no pause over 1 s."""
    gateways = await cluster.start(GATEWAYS, *LOAD_FLAGS)
    plan = [(g, f"g{g}u{i:03d}") for i in range(PER_GATEWAY) for g in range(GATEWAYS)]
    began = time.monotonic()
    users = await log_in_all(gateways, plan, track_presence=True)
    login_seconds = time.monotonic() - began
    log = MessageLog()
    try:
        senders = [u for u in users if int(u.name[3:]) < SENDERS_PER_GATEWAY]
        survivors = [u for u in users if u.gateway != VICTIM]
        victims = [u for u in users if u.gateway == VICTIM]
        victim_names = {u.name for u in victims}
        rng = random.Random(1)
        start = time.monotonic()
        chatting = [
            asyncio.create_task(chatter(s, log, start + SEND_SECONDS, rng)) for s in senders
        ]
        await asyncio.sleep(KILL_AT)  # times the fault: the load has run for a while
        killed_at = time.monotonic()
        gateways[VICTIM].signal(signal.SIGKILL)
        assert await gateways[VICTIM].wait(T) == -signal.SIGKILL
        async with asyncio.timeout(SEND_SECONDS + 2 * T):
            await asyncio.gather(*chatting)

        # Every survivor hears every victim leave; then a marker, so that whatever was
        # published before it (a duplicate leave, a straggling message) has been read.
        deadline = killed_at + REAP_BOUND + T
        heard = await asyncio.gather(
            *(
                u.wait_until(
                    lambda u=u: len(u.leaves or ()) >= len(victims),
                    max(0.1, deadline - time.monotonic()),
                )
                for u in survivors
            )
        )
        marker_sender = next(s for s in senders if s.gateway != VICTIM)
        marker = marker_sender.say(log)
        assert marker is not None
        got_marker = await asyncio.gather(
            *(u.wait_until(lambda u=u: u.saw_up_to(marker), 3 * T) for u in survivors)
        )
        online = await who_names(cluster.redis.url)
    finally:
        await close_all(users)

    survivor_log = "\n".join(
        log_lines(g, "WARNING", "ERROR", "reaped") for i, g in enumerate(gateways) if i != VICTIM
    )
    assert all(u.failure is None and not u.foreign for u in users)
    assert not [u.name for u in survivors if u.end == "dropped"], survivor_log
    assert all(u.end == "dropped" for u in victims)  # the kill ended their connections
    assert all(got_marker), survivor_log

    # Leaves: each victim announced to each survivor exactly once, within 15 s of the kill.
    assert all(heard), survivor_log
    latest_leave = 0.0
    for u in survivors:
        assert u.leaves is not None
        assert set(u.leaves) == victim_names, (u.name, set(u.leaves) ^ victim_names)
        assert all(len(times) == 1 for times in u.leaves.values()), u.name
        latest_leave = max(latest_leave, *(t[0] - killed_at for t in u.leaves.values()))
    assert latest_leave <= REAP_BOUND
    assert sorted(online) == sorted(u.name for u in survivors)

    # Messages: a surviving sender's reach every survivor, all, once each, in order; a
    # victim's (cut off by the kill) reach every survivor as one same prefix of what it sent.
    deliveries = 0
    prefixes: dict[str, list[int]] = {}
    for u in survivors:
        by_sender: dict[str, list[int]] = {s.name: [] for s in senders}
        for number in u.msg_ids:
            by_sender[log.senders[number].name].append(number)
        deliveries += len(u.msg_ids)
        for s in senders:
            got = by_sender[s.name]
            if s.gateway != VICTIM:
                assert got == s.sent, (u.name, s.name, sorted(set(s.sent) ^ set(got))[:10])
            else:
                assert got == s.sent[: len(got)], (u.name, s.name)
                assert prefixes.setdefault(s.name, got) == got, (u.name, s.name)

    # Pauses: the largest gap between consecutive lines from surviving senders, from the
    # kill to the end of the load (the marker, sent later, is left out).
    max_gap, worst = 0.0, ""
    for u in survivors:
        times = [
            t
            for number, t in zip(u.msg_ids, u.msg_times, strict=True)
            if number != marker and log.senders[number].gateway != VICTIM
        ]
        after = [b - a for a, b in pairwise(times) if b > killed_at]
        assert after, u.name
        if max(after) > max_gap:
            max_gap, worst = max(after), u.name
    sent_after = sum(
        1
        for number, at in enumerate(log.sent_at)
        if at > killed_at and log.senders[number].gateway != VICTIM
    )
    print(
        f"\nload-faults: {len(users)} users ({len(senders)} senders) on {GATEWAYS} gateways "
        f"(logged in in {login_seconds:.1f} s), "
        f"gw-{VICTIM + 1} SIGKILLed at {KILL_AT:.0f} s; messages sent {len(log)} "
        f"({sent_after} by survivors after the kill), chat lines received by survivors "
        f"{deliveries}; max gap after the kill {max_gap * 1000:.0f} ms ({worst}); "
        f"victims' leaves all announced {latest_leave:.1f} s after the kill"
    )
    assert max_gap < MAX_GAP, (worst, max_gap, survivor_log)
