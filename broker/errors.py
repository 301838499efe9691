"""The broker's exceptions.

::

    BrokerError
     ├── BrokerUnavailable   Redis could not be reached or did not answer in time (outside
     │                       our control: retry later)
     ├── GatewayIdInUse      another live gateway already runs under this id (operator error)
     └── EventDecodeError    a bus message is not one we understand (a newer or foreign writer)

Every Redis exception is translated to one of these at the edge of :mod:`broker`, so that no
caller imports ``redis``.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error raised by the broker package."""


class BrokerUnavailable(BrokerError):
    """Redis is unreachable, timed out, or refused the operation."""


class GatewayIdInUse(BrokerError):
    """A live gateway instance already holds this gateway id."""


class EventDecodeError(BrokerError):
    """A message on the bus could not be decoded into a room event."""
