"""The gateway's exceptions.

::

    GatewayError
     ├── StartupError           the gateway cannot start (port taken, broker unreachable)
     └── TlsError               a TLS certificate or key cannot be used (at start: the gateway
                                does not start; on SIGHUP: it keeps the previous pair)

What a client gets wrong is a :class:`chatwire.errors.PeerProtocolError` (answered with a
``! `` line); failures of Redis are :class:`broker.errors.BrokerError`, which the gateway turns
into ``! `` lines for the clients concerned while it keeps running.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error raised by the gateway package."""


class StartupError(GatewayError):
    """The gateway could not start; the message is the one line an operator needs."""


class TlsError(GatewayError):
    """A TLS certificate or key cannot be used; the message is the one line an operator
    needs (which file, and what is wrong with it)."""
