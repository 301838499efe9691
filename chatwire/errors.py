"""The wire vocabulary's exceptions.

::

    ChatwireError
     ├── PeerProtocolError      the peer broke the line protocol (answered with a ``! `` line)
     │    ├── InvalidName       a user name the rules do not allow
     │    ├── InvalidRoom       a room name the rules do not allow
     │    └── UsageError        a command with missing or malformed arguments
     └── LocalProtocolError     we misused our own protocol object (a bug here, never the peer's)

The text of a :class:`PeerProtocolError` is what the peer is shown, after ``! ``.
"""

from __future__ import annotations


class ChatwireError(Exception):
    """Base of every error raised by the wire vocabulary and the protocol classes."""


class PeerProtocolError(ChatwireError):
    """The peer sent something the protocol does not accept; the text is shown to it."""


class InvalidName(PeerProtocolError):
    """A proposed user name breaks the naming rules; the text says which rule."""


class InvalidRoom(PeerProtocolError):
    """A room name breaks the naming rules; the text says which rule."""


class UsageError(PeerProtocolError):
    """A command was given arguments it does not take; the text is the whole answer."""


class LocalProtocolError(ChatwireError):
    """Our own code called a protocol object in a state that does not allow it."""
