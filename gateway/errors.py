"""The gateway's exceptions.

::

    GatewayError
     └── StartupError           the gateway cannot start (port taken, broker unreachable)

What a client gets wrong is a :class:`chatwire.errors.PeerProtocolError` (answered with a
``! `` line); failures of Redis are :class:`broker.errors.BrokerError`, which the gateway turns
into ``! `` lines for the clients concerned while it keeps running.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error raised by the gateway package."""


class StartupError(GatewayError):
    """The gateway could not start; the message is the one line an operator needs."""
