"""``chat-admin``: see and steer the cluster through its Redis.

Admin access is access to Redis: whoever can reach it can do what this tool does. Keep Redis
off public networks and give it a password (``redis://:PASSWORD@host:6379/0``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import NoReturn, TypeVar

import click

from broker import BrokerError, GatewayRecord, Kick, Presence, RedisBroker, connect
from chatwire.errors import InvalidRoom
from chatwire.lines import MAX_LINE_BYTES, strip_controls
from chatwire.names import name_key, room_key, validate_room

T = TypeVar("T")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Seconds between looks at whether a kicked user has gone.
KICK_POLL = 0.05


def run_on_broker(url: str, action: Callable[[RedisBroker], Awaitable[T]]) -> T:
    """Run ``action`` against the broker at ``url``; a broker failure is one line on
    stderr and exit status 1, never a traceback."""

    async def go() -> T:
        broker = await connect(url)
        try:
            return await action(broker)
        finally:
            await broker.close()

    try:
        return asyncio.run(go())
    except BrokerError as exc:
        fail(str(exc))


def fail(message: str) -> NoReturn:
    """One line on stderr and exit status 1."""
    click.echo(f"chat-admin: {message}", err=True)
    sys.exit(1)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def duration(seconds: float) -> str:
    """A short human duration: 45s, 12m03s, 3h07m, 2d04h."""
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    show_envvar=True,
    default=DEFAULT_REDIS_URL,
    help="The cluster's Redis (the one its gateways use).",
)
@click.version_option(package_name="chat-service")
@click.pass_context
def main(ctx: click.Context, redis_url: str) -> None:
    """See and steer a chat cluster through its Redis.

    Anyone who can reach that Redis has these powers: never expose it, and put a password in
    the URL (redis://:PASSWORD@host:6379/0).
    """
    ctx.obj = redis_url or DEFAULT_REDIS_URL


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.pass_obj
def who(url: str, as_json: bool) -> None:
    """Everyone online, cluster-wide: name, room, gateway, since when, and idle time."""

    async def action(broker: RedisBroker) -> list[Presence]:
        users = await broker.online()
        return sorted(users, key=lambda u: (u.name.casefold(), u.name))

    users = run_on_broker(url, action)
    now = time.time()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": u.name,
                        "room": u.room,
                        "gateway": u.gateway,
                        "since": iso(u.since),
                        "idle_seconds": round(now - (u.active or u.since), 1),
                        "session": u.session,
                    }
                    for u in users
                ],
                ensure_ascii=False,
                indent=2,
            )
        )
        return
    rows = [
        [u.name, u.room, u.gateway, iso(u.since), duration(now - (u.active or u.since))]
        for u in users
    ]
    click.echo(table(["NAME", "ROOM", "GATEWAY", "CONNECTED SINCE", "IDLE"], rows))
    click.echo(f"{len(rows)} user(s) online")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.pass_obj
def gateways(url: str, as_json: bool) -> None:
    """The live gateways: address, users, uptime, age of the last heartbeat."""
    records = run_on_broker(url, lambda broker: broker.gateways())
    records.sort(key=lambda g: g.id)
    now = time.time()

    def heartbeat_age(g: GatewayRecord) -> float | None:
        return None if g.ttl_left is None else max(0.0, g.ttl - g.ttl_left)

    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "id": g.id,
                        "address": g.address,
                        "users": g.users,
                        "started": iso(g.started),
                        "uptime_seconds": round(now - g.started, 1),
                        "heartbeat_age_seconds": heartbeat_age(g),
                    }
                    for g in records
                ],
                indent=2,
            )
        )
        return
    rows = []
    for g in records:
        age = heartbeat_age(g)
        shown = "expired" if age is None else f"{age:.1f}s ago"
        rows.append([g.id, g.address, str(g.users), duration(now - g.started), shown])
    click.echo(table(["GATEWAY", "ADDRESS", "USERS", "UPTIME", "HEARTBEAT"], rows))
    click.echo(f"{len(rows)} gateway(s)")


@main.command()
@click.argument("name")
@click.option("--reason", default="", help="Shown to the user as they are disconnected.")
@click.option(
    "--wait", default=5.0, type=click.FloatRange(0), help="Seconds to wait for the leave."
)
@click.pass_obj
def kick(url: str, name: str, reason: str, wait: float) -> None:
    """Disconnect NAME, wherever it is connected; everyone sees it leave."""
    reason = " ".join(strip_controls(reason).split())

    key = name_key(name)

    async def action(broker: RedisBroker) -> tuple[Kick | None, bool]:
        target = await broker.kick(key, reason)
        if target is None:
            return None, False
        # The name is freed right after its leave is announced, in whichever room the user
        # was: presence is the one place to watch, and it publishes nothing, so we look.
        try:
            async with asyncio.timeout(wait):
                while (held := await broker.holder(key)) is not None and (  # noqa: ASYNC110
                    held.session == target.session
                ):
                    await asyncio.sleep(KICK_POLL)
        except TimeoutError:
            return target, False
        return target, True

    target, left = run_on_broker(url, action)
    if target is None:
        fail(f"no user named {name!r} is online")
    assert target is not None
    if not left:
        fail(
            f"asked gateway {target.gateway} to disconnect {target.name}, but it has not "
            f"left after {wait:.0f}s (is that gateway down? it is reaped within seconds)"
        )
    click.echo(f"kicked {target.name} from {target.gateway}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.pass_obj
def rooms(url: str, as_json: bool) -> None:
    """The rooms that have users, with how many each (as /rooms shows them)."""
    found = run_on_broker(url, lambda broker: broker.rooms())
    if as_json:
        click.echo(
            json.dumps([{"room": r, "users": n} for r, n in found], ensure_ascii=False, indent=2)
        )
        return
    click.echo(table(["ROOM", "USERS"], [[r, str(n)] for r, n in found]))
    click.echo(f"{len(found)} room(s)")


@main.command()
@click.argument("text", nargs=-1, required=True)
@click.option(
    "--room",
    default=None,
    metavar="#ROOM",
    help="Announce in this room only.  [default: every room]",
)
@click.pass_obj
def announce(url: str, text: tuple[str, ...], room: str | None) -> None:
    """Send TEXT to the users of every room (or of --room) as a `* [admin] TEXT` line."""
    line = " ".join(strip_controls(" ".join(text)).split())
    if not line:
        fail("nothing to announce")
    if len(line.encode()) > MAX_LINE_BYTES:
        fail(f"an announcement has at most {MAX_LINE_BYTES} bytes")
    key = None
    if room is not None:
        try:
            key = room_key(validate_room(room))
        except InvalidRoom as exc:
            fail(f"invalid room name: {exc}")
    reached = run_on_broker(url, lambda broker: broker.announce(line, key))
    if room is not None and not reached:
        fail(f"nobody is in {room}")
    click.echo("announced")
