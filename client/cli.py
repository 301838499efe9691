"""``chat-client``: chat from a terminal, or from a script through a pipe."""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path

import click

from client.connection import tls_context
from client.errors import ConnectFailed, NameRefused
from client.pipe import PipeUI
from client.session import UI, ChatSession

#: Exit statuses a script can tell apart (4, some lines not delivered, is the session's).
EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_NAME_REFUSED = 0, 1, 2, 3
#: The gateway's ports unless --port says otherwise: plain, and TLS (IRC's custom).
PORT, TLS_PORT = 5555, 6697


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--host",
    envvar="CHAT_HOST",
    show_envvar=True,
    default="localhost",
    help="The gateway, or the load balancer in front of several.",
)
@click.option(
    "--port",
    envvar="CHAT_PORT",
    show_envvar=True,
    default=None,
    type=click.IntRange(1, 65535),
    help=f"Its TCP port.  [default: {PORT}, or {TLS_PORT} with --tls]",
)
@click.option(
    "--tls",
    envvar="CHAT_TLS",
    show_envvar=True,
    is_flag=True,
    default=False,
    help="Connect over TLS (the gateway's --tls-port), refusing a server whose certificate "
    "is not signed by a trusted CA or not made out to HOST.",
)
@click.option(
    "--tls-ca",
    envvar="CHAT_TLS_CA",
    show_envvar=True,
    default=None,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Trust the CA certificates in FILE (PEM) too, beside the system's: a private CA's. "
    "Implies --tls.",
)
@click.option(
    "--name",
    envvar="CHAT_NAME",
    show_envvar=True,
    default=None,
    help="Your name in the chat; asked for when absent (in a pipe: the first line of input).",
)
@click.option(
    "--give-up-after",
    default=300.0,
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="Stop trying to reconnect after this long.",
)
@click.version_option(package_name="chat-service")
def cli(
    host: str,
    port: int | None,
    tls: bool,
    tls_ca: Path | None,
    name: str | None,
    give_up_after: float,
) -> None:
    """Chat with the users of HOST:PORT, in #lobby and any room you /join.

    On a terminal: type a line and press Enter to send it; the prompt shows your name and
    room; /help lists the commands (/join #ROOM, /part, /rooms, /who, /msg NAME TEXT,
    /history); the arrow keys recall earlier lines; sair, /quit, Ctrl-D or Ctrl-C leave.
    If the connection drops the client reconnects by itself, logs in again under the same
    name and goes back to the room you were in.

    In a pipe (stdin not a terminal): each input line is sent, each server line is
    printed unchanged, every line is delivered (a gateway that paces a fast sender just
    makes it slower), and at the end of input the client waits for the server to answer
    every line, leaves and exits 0. Exit status 1: the gateway could not be reached; 3:
    the name was refused; 4: some lines were refused by the server or never confirmed
    (one line on stderr names each); the reason is always on stderr.

    With --tls the connection is encrypted and the server's certificate checked: one it
    fails is refused (exit status 1), on reconnections too.
    """
    context = _tls_context(tls_ca) if tls or tls_ca is not None else None
    if port is None:
        port = PORT if context is None else TLS_PORT
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    ui: UI
    if interactive:
        from client.terminal import TerminalUI  # prompt_toolkit only where it is needed

        ui = TerminalUI()
    else:
        ui = PipeUI()
    session = ChatSession(host, port, name, ui, interactive=interactive,
                          give_up_after=give_up_after, tls=context)  # fmt: skip
    try:
        sys.exit(asyncio.run(session.run()))
    except ConnectFailed as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    except NameRefused as exc:
        fail(f"name refused: {exc}", EXIT_NAME_REFUSED)


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The client's TLS context; a --tls-ca file it cannot use is a usage error."""
    try:
        return tls_context(ca_file)
    except ssl.SSLError:  # read, but not certificates
        problem = f"{ca_file} holds no PEM certificate"
    except OSError as exc:
        problem = f"cannot read {ca_file}: {exc.strerror or exc}"
    raise click.BadParameter(problem, param_hint="'--tls-ca'")


def fail(message: str, status: int) -> None:
    click.echo(f"chat-client: {message}", err=True)
    sys.exit(status)


def main() -> None:
    """Entry point: every failure is one line on stderr, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message(), EXIT_USAGE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.exit(130)
