"""What a :class:`~gateway.session.Session` needs of its connection: the few transport
methods it calls, as a structural type.

An asyncio TCP transport (the standard library's or uvloop's) has them all, so the TCP path
pays nothing for this: the type exists for the checker, not at run time. The WebSocket
adapter (:mod:`gateway.web.transport`) implements the same methods over a WebSocket
connection, so that a browser's session goes through the same protocol, flood control,
output bound and gateway paths as a TCP one.
"""

from __future__ import annotations

from typing import Any, Protocol


class LineTransport(Protocol):
    """A byte stream of protocol lines to one client, with flow control both ways."""

    def write(self, data: bytes) -> None:
        """Queue whole lines (each ending in LF) for the client; never blocks."""

    def get_write_buffer_size(self) -> int:
        """Bytes queued for the client and not yet taken by the network."""

    def is_closing(self) -> bool:
        """True once :meth:`close` or :meth:`abort` was called, or the peer is gone."""

    def close(self) -> None:
        """Close once what is queued has been written."""

    def abort(self) -> None:
        """Close now, discarding what is queued."""

    def pause_reading(self) -> None:
        """Deliver no more input until :meth:`resume_reading`."""

    def resume_reading(self) -> None:
        """Deliver input again."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername`` (the client's address) and ``socket`` at least."""
