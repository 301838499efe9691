"""A WebSocket connection as a :class:`~gateway.transport.LineTransport`: the thin adapter
that lets a browser's session run on the very same :class:`~gateway.session.Session`,
protocol, flood control and output bound as a TCP client.

The mapping (PROTOCOL.md, "WebSocket"):

* **In:** each text frame is one line, its LF implied (one trailing LF or CRLF is allowed
  and dropped). The frame's text, with an LF added, is fed to the session as bytes, so
  every rule of the line protocol applies unchanged: a line over 4096 bytes is refused
  with ``! line too long``, controls are removed, and so on. A frame with a line break
  inside gets a ``! `` line (:data:`~chatwire.texts.FRAME_LINE_BREAK_TEXT`) and is not
  sent. A binary frame closes the connection with 1003 (unsupported data); invalid UTF-8
  in a text frame with 1007 and a message over :data:`MAX_MESSAGE_BYTES` with 1009 (both
  by the websockets library).
* **Out:** whatever the session writes is whole lines; each is sent as one text frame,
  without its LF.
* **Flow control:** while the session has paused reading (flood control, a name claim or
  a move under way, too many unpublished lines) no frame is read; frames then wait in the
  library's small queue (:data:`MAX_QUEUED_FRAMES`), past which it stops reading the socket
  and TCP pushes back on the client, exactly as for a TCP client.
* **Slow readers:** :meth:`get_write_buffer_size` is the socket transport's, so the
  session's 1 MiB bound cuts a browser that stopped reading as it cuts a TCP client.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from chatwire.lines import MAX_LINE_BYTES
from chatwire.texts import FRAME_LINE_BREAK_TEXT

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from gateway.session import Session

log = logging.getLogger(__name__)

#: Largest message (all fragments of it together) read from a client. A line is at most
#: 4096 bytes; a frame up to four times that is read and refused as the line protocol
#: refuses a long line (``! line too long``, the connection goes on), so a client that
#: counts characters instead of bytes is told, not cut. Past it the library closes the
#: connection with 1009 rather than buffer it: this bounds what one frame can pin.
MAX_MESSAGE_BYTES = 4 * MAX_LINE_BYTES
#: Frames the library buffers while the session does not read (flood control): past this
#: it stops reading the socket. With :data:`MAX_MESSAGE_BYTES` it bounds a paused client's
#: memory at 64 KiB, like the one read's worth a paused TCP client may leave behind.
MAX_QUEUED_FRAMES = 4
#: Seconds the closing handshake may take before the connection is cut.
CLOSE_TIMEOUT = 5.0

_UNSUPPORTED_DATA_REASON = "text frames only: one line per frame"


class WebSocketTransport:
    """One WebSocket client, seen by its session as a line transport."""

    __slots__ = ("_closer", "_closing", "_conn", "_reading", "_resumed")

    def __init__(self, conn: ServerConnection) -> None:
        self._conn = conn
        self._reading = True
        self._resumed = asyncio.Event()
        self._closing = False
        #: The closing handshake, once started: kept so that it is not collected, and
        #: awaited before the session hears that the connection is gone.
        self._closer: asyncio.Task[None] | None = None

    # -- LineTransport -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send each line of ``data`` as one text frame, in one write to the socket.

        Never blocks, like a socket transport's write: the session bounds what may queue.
        """
        conn = self._conn
        if self._closing or conn.protocol.state is not State.OPEN:
            return
        protocol = conn.protocol
        lines = data.split(b"\n")
        if not lines[-1]:
            lines.pop()  # the LF that ends the last line
        for line in lines:
            protocol.send_text(line)
        # An OPEN connection's frames are all data: the end-of-stream marker (an empty
        # chunk) only follows a close, which this connection has not sent.
        conn.transport.writelines(protocol.data_to_send())

    def get_write_buffer_size(self) -> int:
        return int(self._conn.transport.get_write_buffer_size())

    def is_closing(self) -> bool:
        return self._closing or self._conn.protocol.state is not State.OPEN

    def close(self) -> None:
        """The closing handshake (1000) after the frames already written."""
        self._end(CloseCode.NORMAL_CLOSURE, "")

    def abort(self) -> None:
        self._closing = True
        self._resumed.set()
        self._conn.transport.abort()

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        self._reading = True
        self._resumed.set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._conn.remote_address
        return self._conn.transport.get_extra_info(name, default)

    # -- the connection's life -----------------------------------------------------------

    async def serve(self, session: Session) -> None:
        """Run ``session`` over this connection until either side ends it; the session
        hears of the end exactly once (``connection_lost``), whatever ended it."""
        try:
            session.attach(self)
            while await self._readable():
                message = await self._conn.recv()
                if not await self._readable():
                    break  # closed while the message was on its way: it is dropped
                self._feed(session, message)
        except ConnectionClosed:
            pass  # the client closed, or the network failed: same as a TCP hang-up
        except Exception:
            # Nothing raises into the server: log it, and end this connection alone.
            log.exception("unexpected error serving WebSocket %s", session.id)
            self.abort()
        finally:
            try:
                if self._closer is not None:
                    await asyncio.shield(self._closer)
            finally:
                session.connection_lost(None)

    def _feed(self, session: Session, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self._end(CloseCode.UNSUPPORTED_DATA, _UNSUPPORTED_DATA_REASON)
            return
        line = message[:-1] if message.endswith("\n") else message
        if "\n" in line:
            session.refuse_line(FRAME_LINE_BREAK_TEXT)
            return
        session.data_received(line.encode() + b"\n")

    async def _readable(self) -> bool:
        """Wait while reading is paused; False once the connection is closing or closed."""
        while not self._reading and not self.is_closing():
            self._resumed.clear()
            resumed = asyncio.ensure_future(self._resumed.wait())
            closed = asyncio.ensure_future(self._conn.wait_closed())
            try:
                await asyncio.wait({resumed, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                resumed.cancel()
                closed.cancel()
        return not self.is_closing()

    def _end(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._resumed.set()
        self._closer = asyncio.ensure_future(self._conn.close(code, reason))
