"""Where Redis's exceptions stop: every Redis failure becomes a broker error here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis.exceptions

from broker.errors import BrokerUnavailable


@contextmanager
def unavailable_on_error(what: str) -> Iterator[None]:
    """Translate every Redis failure into :class:`BrokerUnavailable` at the package edge."""
    try:
        yield
    except (redis.exceptions.RedisError, OSError) as exc:
        raise BrokerUnavailable(f"{what}: {exc or type(exc).__name__}") from exc


def text(value: bytes | str) -> str:
    """A Redis reply as text (replies are bytes unless the client decodes them)."""
    return value.decode() if isinstance(value, bytes) else str(value)
