"""The classroom design, as the benchmark's comparison target: the socket chat taught in
classrooms, which this service began as. One Python process, ``socket`` and
``threading``, a thread per client; a global lock around the client list, and each
message written with ``sendall`` to every client in turn, the sender included (echo).

It speaks the gateway's texts (``chatwire.texts``) for what the load generator reads: the
name prompt, the welcome, ``name: text`` lines, join and leave notices, ``sair`` to
leave. There are no rooms, no commands and no checks on names: that is the design.

``python -m bench.classroom --port P`` runs it; the benchmark starts it that way
(``bench.procs.Cluster.start_classroom``). Its slowness is the point of comparison: do
not optimise it.

Like the classic code it keeps the socket defaults, Nagle's algorithm included: a small
write waits for the previous one's acknowledgement, which the receiver delays, so at low
rates many lines arrive tens of milliseconds late. ``--nodelay`` turns that off
(``TCP_NODELAY``, as asyncio does for every connection), to tell that delay apart from the
cost of the design itself.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading

import click

from chatwire.lines import MAX_LINE_BYTES
from chatwire.texts import (
    PROMPT,
    QUIT_WORDS,
    chat_line,
    goodbye_text,
    joined_text,
    left_text,
    notice_line,
    welcome_text,
)

#: Bytes asked of ``recv`` at a time, as the classic code does.
RECV_BYTES = 4096
#: Connections waiting to be accepted: the kernel's usual cap, so that a login storm
#: waits in the backlog instead of being refused.
BACKLOG = 4096


class ClassroomServer:
    """The classic threaded chat server on one listening socket."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, nodelay: bool = False) -> None:
        self._listener = socket.create_server((host, port), backlog=BACKLOG)
        self._nodelay = nodelay
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, str] = {}  # guarded by _lock
        self._closed = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def serve_forever(self) -> None:
        """Accept clients until :meth:`close`, starting a thread for each."""
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue  # e.g. out of descriptors for a moment: keep serving the rest
            threading.Thread(target=self._serve_client, args=(conn,), daemon=True).start()

    def close(self) -> None:
        """Stop accepting and end every connection (safe to call twice)."""
        self._closed.set()
        # shutdown wakes a thread blocked in accept(); close alone may not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def broadcast(self, data: bytes, skip: socket.socket | None = None) -> None:
        """``data`` to every client but ``skip``, one ``sendall`` each, under the lock."""
        with self._lock:
            self._send_locked(data, skip)

    def _send_locked(self, data: bytes, skip: socket.socket | None) -> None:
        for conn in self._clients:
            if conn is not skip:
                # A failed send is its own thread's to notice: it removes the client.
                with contextlib.suppress(OSError):
                    conn.sendall(data)

    def _serve_client(self, conn: socket.socket) -> None:
        buffer = b""
        name: str | None = None
        try:
            if self._nodelay:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(notice_line(PROMPT))
            while True:
                data = conn.recv(RECV_BYTES)
                if not data:
                    return
                *lines, buffer = (buffer + data).split(b"\n")
                if len(buffer) > MAX_LINE_BYTES:
                    return  # no line this long is ever sent: not a chat client
                texts = [line.decode(errors="replace").rstrip("\r") for line in lines]
                if name is None:
                    if not texts:
                        continue
                    name = texts.pop(0).strip()
                    if not name:
                        name = None
                        conn.sendall(notice_line(PROMPT))
                        continue
                    # The welcome first, then everyone's lines; the join is told in the
                    # same step, so that whoever logs in next never hears of it.
                    with self._lock:
                        self._clients[conn] = name
                        conn.sendall(notice_line(welcome_text(name, len(self._clients))))
                        self._send_locked(notice_line(joined_text(name)), skip=conn)
                out: list[bytes] = []
                for text in texts:
                    if text.strip().lower() in QUIT_WORDS:
                        if out:
                            self.broadcast(b"".join(out))
                        conn.sendall(notice_line(goodbye_text(name)))
                        return
                    out.append(chat_line(name, text))
                if out:
                    # One recv, one broadcast: the classic loop, with each line named.
                    self.broadcast(b"".join(out))
        except OSError:
            pass
        finally:
            with self._lock:
                joined = self._clients.pop(conn, None) is not None
            if joined and name is not None:
                self.broadcast(notice_line(left_text(name)))
            conn.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", default=5555, help="TCP port (0: any free port, printed).")
@click.option("--nodelay", is_flag=True, help="Turn Nagle's algorithm off (TCP_NODELAY).")
def main(host: str, port: int, nodelay: bool) -> None:
    """Run the classroom chat server (the benchmark's comparison target) until killed."""
    server = ClassroomServer(host, port, nodelay)
    click.echo(f"classroom: listening on {server.address[0]}:{server.address[1]}", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
