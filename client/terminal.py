"""The interactive client: incoming lines print above the input line, never through it.

prompt_toolkit redraws the input line (and whatever the user has typed so far) after each
line printed while a prompt is active, so a message arriving mid-word never garbles the
typing. Each kind of line has its own look: the user's own messages, other people's (a
stable colour per name), system notices and errors; every line carries a timestamp.
"""

from __future__ import annotations

import time
import zlib

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import InMemoryHistory

from chatwire.names import DEFAULT_ROOM
from chatwire.texts import parse_in_room, parse_welcome
from client.protocol import PROMPT_LINE, Kind, ServerLine

#: Colours for other people's names; a name always gets the same one.
PALETTE = (
    "ansigreen",
    "ansiyellow",
    "ansiblue",
    "ansimagenta",
    "ansicyan",
    "ansired",
    "ansibrightgreen",
    "ansibrightyellow",
    "ansibrightblue",
    "ansibrightmagenta",
    "ansibrightcyan",
    "ansibrightred",
)


def name_colour(name: str) -> str:
    return PALETTE[zlib.crc32(name.casefold().encode()) % len(PALETTE)]


def render(line: ServerLine, me: str | None, now: float | None = None) -> FormattedText:
    """The styled fragments for one server line."""
    stamp = ("ansibrightblack", time.strftime("%H:%M ", time.localtime(now)))
    if line.kind is Kind.CHAT and line.name is not None:
        if line.name == me:
            return FormattedText([stamp, ("bold", f"{line.name}: "), ("", line.text)])
        return FormattedText([stamp, (f"bold {name_colour(line.name)}", f"{line.name}: "),
                              ("", line.text)])  # fmt: skip
    if line.kind is Kind.PRIVATE and line.name is not None:
        # Private lines stand out whoever sent them: reverse video, and who it was for.
        label = f"(private to {line.to}) " if line.to is not None else "(private) "
        return FormattedText([stamp, ("reverse ansimagenta", label),
                              (f"bold {name_colour(line.name)}", f" {line.name}: "),
                              ("ansimagenta", line.text)])  # fmt: skip
    if line.kind is Kind.ERROR:
        return FormattedText([stamp, ("ansired bold", f"! {line.text}")])
    return FormattedText([stamp, ("italic ansibrightblack", f"* {line.text}")])


class TerminalUI:
    """The session's UI on a terminal, with input history on the arrow keys."""

    def __init__(self) -> None:
        self._input = PromptSession[str](history=InMemoryHistory())
        self._me: str | None = None
        self._room = DEFAULT_ROOM

    def show(self, line: ServerLine) -> None:
        if line.raw == PROMPT_LINE:
            return  # we ask for the name ourselves
        if line.kind is Kind.NOTICE:
            if parse_welcome(line.text):
                self._room = DEFAULT_ROOM
            elif moved := parse_in_room(line.text):
                self._room = moved[0]
            if self._input.app.is_running:
                self._input.app.invalidate()  # the prompt names the room
        print_formatted_text(render(line, self._me))

    def prompt(self) -> str:
        """The input prompt: who you are and where (``ana #math> ``)."""
        return f"{self._me} {self._room}> " if self._me else "> "

    def status(self, text: str) -> None:
        print_formatted_text(
            FormattedText(
                [("ansibrightblack", time.strftime("%H:%M ")), ("ansiyellow", f"-- {text}")]
            )
        )

    def joined(self, name: str) -> None:
        self._me = name

    async def ask_name(self) -> str | None:
        while True:
            try:
                name = await PromptSession[str]().prompt_async("Your name: ")
            except (EOFError, KeyboardInterrupt):
                return None
            if name.strip():
                return name.strip()

    async def read_input(self) -> str | None:
        try:
            return await self._input.prompt_async(self.prompt)
        except (EOFError, KeyboardInterrupt):
            return None
