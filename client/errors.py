"""The client's exceptions.

::

    ClientError
     ├── ConnectFailed    no connection could be made (refused, unknown host, timeout)
     └── NameRefused      the server would not take the name (pipe mode cannot ask again)
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of the client's errors; the message is the one line a user sees."""


class ConnectFailed(ClientError):
    """The gateway could not be reached."""


class NameRefused(ClientError):
    """The server refused the name; the message is its reason."""
