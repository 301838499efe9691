"""The gateway's exceptions.

::

    GatewayError
     ├── PeerProtocolError      the client broke the line protocol (answered with a ``! `` line)
     │    └── InvalidName       a name the rules do not allow
     ├── LocalProtocolError     we misused our own protocol object (a bug here, never the peer's)
     └── StartupError           the gateway cannot start (port taken, broker unreachable)

Failures of Redis itself are :class:`broker.errors.BrokerError`; the gateway turns them into
``! `` lines for the clients concerned and keeps running.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error raised by the gateway package."""


class PeerProtocolError(GatewayError):
    """The client sent something the protocol does not accept; the text is shown to it."""


class InvalidName(PeerProtocolError):
    """A proposed user name breaks the naming rules; the text says which rule."""


class LocalProtocolError(GatewayError):
    """Our own code called the protocol object in a state that does not allow it."""


class StartupError(GatewayError):
    """The gateway could not start; the message is the one line an operator needs."""
