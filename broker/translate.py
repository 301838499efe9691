"""Where Redis's exceptions stop: every Redis failure becomes a broker error here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis.exceptions
from redis.asyncio.sentinel import MasterNotFoundError, SlaveNotFoundError

from broker.errors import BrokerUnavailable


@contextmanager
def unavailable_on_error(what: str) -> Iterator[None]:
    """Translate every Redis failure into :class:`BrokerUnavailable` at the package edge."""
    try:
        yield
    except (MasterNotFoundError, SlaveNotFoundError) as exc:
        # redis-py appends the whole Sentinel client's repr: keep the sentence only.
        reason = str(exc).split(" : ", 1)[0]
        raise BrokerUnavailable(f"{what}: {reason} (no Sentinel answered with one)") from exc
    except (redis.exceptions.RedisError, OSError) as exc:
        raise BrokerUnavailable(f"{what}: {str(exc) or type(exc).__name__}") from exc


@contextmanager
def unavailable_on_teardown(what: str) -> Iterator[None]:
    """As :func:`unavailable_on_error`, for a command sent on a pub/sub connection that
    another task may be tearing down (the link broke): redis-py's asyncio connection then
    fails with AttributeError (its writer already None) instead of a connection error."""
    try:
        with unavailable_on_error(what):
            yield
    except AttributeError as exc:
        raise BrokerUnavailable(f"{what}: the connection closed meanwhile ({exc})") from exc


def text(value: bytes | str) -> str:
    """A Redis reply as text (replies are bytes unless the client decodes them)."""
    return value.decode() if isinstance(value, bytes) else str(value)
