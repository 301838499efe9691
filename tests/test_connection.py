"""From a Redis URL to a deployment (broker/connection.py): Sentinel URLs parsed or refused
with a reason, passwords kept out of logs, and the scripts' publish command per mode."""

from __future__ import annotations

from typing import Any

import pytest

from broker import BrokerUnavailable, connection, scripts
from broker.connection import (
    Mode,
    SentinelAddress,
    open_url,
    parse_sentinel_url,
    redact_url,
    sentinel,
    standalone,
)
from broker.subscription import Subscription
from broker.translate import unavailable_on_teardown


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://127.0.0.1:26379/chat",
            SentinelAddress((("127.0.0.1", 26379),), "chat", 0, None),
        ),
        (
            "redis+sentinel://:s3cret@a:1,b:2, c:3/chat/2",
            SentinelAddress((("a", 1), ("b", 2), ("c", 3)), "chat", 2, "s3cret"),
        ),
        (
            "redis+sentinel://[::1]:26379/my%20service",
            SentinelAddress((("::1", 26379),), "my service", 0, None),
        ),
    ],
)
def test_a_sentinel_url_names_sentinels_service_db_and_password(
    url: str, expected: SentinelAddress
) -> None:
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+sentinel://a:1", "expected /SERVICE"),
        ("redis+sentinel://a:1/", "expected /SERVICE"),
        ("redis+sentinel://a:1/chat/x", "the database must be a number"),
        ("redis+sentinel://a:1/chat/0/more", "expected /SERVICE"),
        ("redis+sentinel://a/chat", "expected HOST:PORT"),
        ("redis+sentinel://a:1,:2/chat", "expected HOST:PORT"),
        ("redis+sentinel://a:99999/chat", "expected HOST:PORT"),
        ("redis+sentinel://a:1,,b:2/chat", "expected HOST:PORT"),
    ],
)
def test_a_bad_sentinel_url_is_refused_with_its_reason(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_sentinel_url(url)
    with pytest.raises(BrokerUnavailable, match=f"invalid Redis URL .*{reason}"):
        sentinel(url)


def test_a_sentinel_urls_password_is_redacted() -> None:
    url = "redis+sentinel://:s3cret@a:1,b:2/chat"
    assert redact_url(url) == "redis+sentinel://:***@a:1,b:2/chat"


def test_a_sentinel_connection_names_its_service_and_sentinels_and_hides_the_password() -> None:
    """Nothing is contacted: the clients are made, and described for the logs."""
    connection = sentinel("redis+sentinel://:s3cret@127.0.0.1:1,127.0.0.1:2/chat/3")
    assert connection.mode is Mode.SENTINEL
    assert connection.replica is not None
    assert "s3cret" not in connection.description
    assert connection.description == (
        "Redis service 'chat' through Sentinel at 127.0.0.1:1,127.0.0.1:2"
    )


async def test_a_unix_socket_url_makes_clients_without_tcp_options() -> None:
    """unix:// names one Redis through its socket; redis-py refuses TCP keepalive there, so
    the clients are made without it (no I/O yet)."""
    made = standalone("unix:///run/redis/redis.sock?db=2")
    try:
        assert made.mode is Mode.STANDALONE
        kwargs = made.commands.connection_pool.connection_kwargs
        assert kwargs["path"] == "/run/redis/redis.sock"
        assert "socket_keepalive" not in kwargs
    finally:
        await made.commands.aclose()
        await made.bus.aclose()


async def test_a_unix_socket_url_of_a_cluster_node_is_refused_with_a_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-py's cluster client has no Unix sockets: a node's socket is refused, saying to
    give its redis:// address."""

    async def clustered(url: str) -> bool:
        return True

    monkeypatch.setattr(connection, "_is_cluster", clustered)
    with pytest.raises(BrokerUnavailable, match="give a node's redis:// address"):
        await open_url("unix:///run/redis/redis.sock")


def test_scripts_publish_sharded_on_a_cluster_only() -> None:
    """On a cluster every event goes out with SPUBLISH (the room's node alone carries it);
    on one Redis with PUBLISH."""
    for sharded, command in ((True, "SPUBLISH"), (False, "PUBLISH")):
        sources = scripts.sources(sharded)
        assert set(sources) == set(scripts.GLOBAL_SCRIPTS) | set(scripts.ROOM_SCRIPTS)
        for name in ("publish", "enter", "leave", "force_leave", "send_to_holder"):
            assert sources[name].startswith(f"local PUBLISH = '{command}'\n"), name
        assert all("redis.call('PUBLISH'" not in source for source in sources.values())


class _TornDown:
    """A pub/sub whose connection another task has just torn down, as redis-py's asyncio
    connection then fails: its writer is None."""

    async def unsubscribe(self, *channels: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    subscribe = unsubscribe


async def test_unsubscribing_while_the_link_is_torn_down_is_unavailability() -> None:
    """The relay treats a failed unsubscribe as a broken link (BrokerUnavailable): the
    AttributeError redis-py raises then must not escape as a crash."""
    subscription = Subscription(_TornDown(), "gw-1")  # type: ignore[arg-type]
    subscription.rooms.add("#math")
    with pytest.raises(BrokerUnavailable, match="unsubscribe: the connection closed"):
        await subscription.remove("#math")


def test_teardown_translation_leaves_other_errors_alone() -> None:
    with pytest.raises(KeyError), unavailable_on_teardown("x"):
        raise KeyError("not a teardown")
