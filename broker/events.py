"""The bus schema: every event that travels through Redis, and its one encoding.

Every event is encoded here, in Python, and handed to the Lua scripts already encoded;
the scripts only append it to a stream and publish it. Decoding is here too, so each kind
is spelled once (``tests/test_events.py`` round-trips every kind, through Lua as well).

**Room events** go to a room's stream and channel in one atomic step, so each carries its
stream id: the id orders the room's events cluster-wide and lets a gateway that lost its
subscription replay exactly what it missed and drop what it already delivered. On the
channel a message is ``<stream id> <body>``; in the stream the body is the entry's field
``d``. A body is JSON, except a chat message's: ``m NAME: TEXT``, the line itself as every
recipient is sent it (names hold no ``:`` and no space, lines no line break), so the
gateways fan it out as it comes, without decoding and encoding it again. (Chat messages
in JSON, as earlier versions wrote them, are still read.)

Chat messages published in one step (a gateway sends what its users typed meanwhile in
one script call) travel as one bus message, a **run**: ``<id>,<id>,... m LINE\nLINE...``,
their stream ids in order, comma-separated, then their lines in the same order, so a
gateway writes the whole run to each member as it comes, with no work per message. In the
streams each message is still its own entry. A single message is the run of one.

**Inbox events** go to one gateway's inbox channel only (a private message for one of its
users, an operator's kick); they are not kept.

=========  =====  ===============================================================
kind       where  fields
=========  =====  ===============================================================
``msg``    room   name, text (not JSON: ``m NAME: TEXT``)
``join``   room   name, gateway, session, room ("" for a login, else the room's
                  name: the user moved in)
``leave``  room   name, gateway, session, to ("" for leaving the chat, else the
                  room the user moved on to)
``notice`` room   text (an operator's announcement)
``pm``     inbox  key (the recipient's folded name), sender, text
``kick``   inbox  key (the folded name of the user to remove), reason
=========  =====  ===============================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from broker.errors import EventDecodeError
from chatwire.texts import CHAT_SEPARATOR

# --- room events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatMessage:
    id: str
    name: str
    text: str
    #: ``NAME: TEXT`` and a newline, the bytes every recipient is sent, as they came off
    #: the bus ("": not at hand, made from the name and text).
    line: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ChatRun:
    """Chat messages that follow each other in a room's stream, as one bus message
    carried them: their stream ids in order, and their lines, each ending in a newline,
    exactly as every recipient is sent them."""

    ids: tuple[str, ...]
    lines: bytes = field(repr=False)

    @property
    def id(self) -> str:
        """The last message's stream id: delivering the run delivers up to it."""
        return self.ids[-1]

    def messages(self) -> list[ChatMessage]:
        """The run, message by message."""
        texts = self.lines.decode().split("\n")
        return [
            ChatMessage(event_id, *_split_line(event_id, line), line.encode() + b"\n")
            for event_id, line in zip(self.ids, texts, strict=False)
        ]

    def after(self, last: tuple[int, int]) -> ChatRun | None:
        """What of the run follows stream position ``last`` (None: nothing)."""
        kept = [m for m in self.messages() if stream_id_key(m.id) > last]
        if not kept:
            return None
        return ChatRun(tuple(m.id for m in kept), b"".join(m.line for m in kept))


@dataclass(frozen=True, slots=True)
class UserJoined:
    """``name`` entered the room: by logging in (``room`` empty) or by moving in."""

    id: str
    name: str
    gateway: str
    session: str
    room: str = ""


@dataclass(frozen=True, slots=True)
class UserLeft:
    """``name`` left the room: the chat (``to`` empty) or for the room ``to``."""

    id: str
    name: str
    gateway: str
    session: str
    to: str = ""


@dataclass(frozen=True, slots=True)
class Announcement:
    """A system line from an operator, for every member of the room."""

    id: str
    text: str


RoomEvent = ChatMessage | ChatRun | UserJoined | UserLeft | Announcement


# --- inbox events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrivateDelivery:
    """A private message for the user whose folded name is ``key``, on the gateway whose
    inbox it reached."""

    key: str
    sender: str
    text: str


@dataclass(frozen=True, slots=True)
class UserKicked:
    """An operator asked the gateway holding name ``key`` to disconnect its user."""

    key: str
    reason: str


InboxEvent = PrivateDelivery | UserKicked


# --- encoding -------------------------------------------------------------------------------


def _encode(fields: dict[str, Any]) -> str:
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


#: What a chat message's body starts with (no JSON body does).
MESSAGE_MARK = "m "
_MESSAGE_MARK = MESSAGE_MARK.encode()


def encode_message(name: str, text: str) -> str:
    """The body of a chat message, ``m NAME: TEXT`` (the id is added by Redis when it is
    appended)."""
    return f"{MESSAGE_MARK}{name}{CHAT_SEPARATOR}{text}"


def encode_join(name: str, gateway: str, session: str, room: str = "") -> str:
    return _encode(
        {"kind": "join", "name": name, "gateway": gateway, "session": session, "room": room}
    )


def encode_leave(name: str, gateway: str, session: str, to: str = "") -> str:
    return _encode({"kind": "leave", "name": name, "gateway": gateway, "session": session,
                    "to": to})  # fmt: skip


def encode_announcement(text: str) -> str:
    return _encode({"kind": "notice", "text": text})


def encode_private(key: str, sender: str, text: str) -> str:
    return _encode({"kind": "pm", "key": key, "sender": sender, "text": text})


def encode_kick(key: str, reason: str) -> str:
    return _encode({"kind": "kick", "key": key, "reason": reason})


def encode_member(name: str, gateway: str) -> str:
    """A room member's record (the value of its session in the room's members hash)."""
    return _encode({"name": name, "gateway": gateway})


def decode_member(body: str | bytes) -> tuple[str, str]:
    """(name, gateway) from a member record."""
    fields = json.loads(body)
    return str(fields["name"]), str(fields["gateway"])


# --- decoding -------------------------------------------------------------------------------


def stream_id_key(event_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair; ids are ``<milliseconds>-<sequence>``."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def decode_bus_message(data: bytes | str) -> RoomEvent:
    """Decode ``<stream id> <body>`` (or a run, ``<id>,<id>,... m LINE\nLINE...``) from a
    room channel."""
    if isinstance(data, str):
        data = data.encode()
    raw_id, _, body = data.partition(b" ")
    if b"," in raw_id:
        return _run(raw_id, body)
    event_id = raw_id.decode("ascii", "replace")
    try:
        stream_id_key(event_id)
    except ValueError:
        raise EventDecodeError(f"not a stream id: {event_id[:40]!r}") from None
    return decode_event(event_id, body)


def _split_line(event_id: str, line: str) -> tuple[str, str]:
    """(name, text) of a chat line, ``NAME: TEXT``."""
    name, found, text = line.partition(CHAT_SEPARATOR)
    if not found:
        raise EventDecodeError(f"event {event_id}: a chat message without a name")
    return name, text


def _message(event_id: str, line: bytes) -> ChatMessage:
    """The chat message whose body is ``m `` and then ``line`` (``NAME: TEXT``)."""
    try:
        decoded = line.decode()
    except UnicodeDecodeError:  # not written by a gateway: what reaches clients is UTF-8
        decoded, line = line.decode("utf-8", "replace"), b""
    return ChatMessage(event_id, *_split_line(event_id, decoded), line and line + b"\n")


def _run(raw_ids: bytes, body: bytes) -> ChatRun:
    """The run of chat messages with stream ids ``raw_ids`` (comma-separated) whose body
    is ``m `` and then their lines. Checked as a whole (its ids are in order, there is a
    line for each, and it is UTF-8), never message by message: that is what it saves."""
    ids = tuple(raw_ids.decode("ascii", "replace").split(","))
    try:
        first, last = stream_id_key(ids[0]), stream_id_key(ids[-1])
    except ValueError:
        raise EventDecodeError(f"not stream ids: {raw_ids[:40]!r}") from None
    lines = body[len(_MESSAGE_MARK) :] + b"\n"
    if (
        not body.startswith(_MESSAGE_MARK)
        or first >= last
        or lines.count(b"\n") != len(ids)
        or b"\n\n" in lines
    ):
        raise EventDecodeError(f"a malformed run of {len(ids)} messages at {ids[0]}")
    try:
        lines.decode()
    except UnicodeDecodeError:  # not written by a gateway: what reaches clients is UTF-8
        lines = lines.decode("utf-8", "replace").encode()
    return ChatRun(ids, lines)


def _fields(body: str | bytes, what: str) -> dict[str, Any]:
    try:
        fields = json.loads(body)
    except ValueError as exc:
        raise EventDecodeError(f"undecodable {what}: {exc}") from exc
    if not isinstance(fields, dict):
        raise EventDecodeError(f"undecodable {what}: not an object")
    return fields


def decode_event(event_id: str, body: str | bytes) -> RoomEvent:
    """Decode the body of the room event with stream id ``event_id``."""
    if isinstance(body, str):
        body = body.encode()
    if body.startswith(_MESSAGE_MARK):
        return _message(event_id, body[len(_MESSAGE_MARK) :])
    fields = _fields(body, f"event {event_id}")
    kind = fields.get("kind")
    try:
        if kind == "msg":
            return ChatMessage(event_id, str(fields["name"]), str(fields["text"]))
        if kind == "join":
            return UserJoined(
                event_id,
                str(fields["name"]),
                str(fields["gateway"]),
                str(fields["session"]),
                str(fields.get("room") or ""),
            )
        if kind == "leave":
            return UserLeft(
                event_id,
                str(fields["name"]),
                str(fields["gateway"]),
                str(fields["session"]),
                str(fields.get("to") or ""),
            )
        if kind == "notice":
            return Announcement(event_id, str(fields["text"]))
    except KeyError as exc:
        raise EventDecodeError(f"event {event_id} lacks {exc}") from exc
    raise EventDecodeError(f"unknown event kind {kind!r} in {event_id}")


def decode_inbox(body: str | bytes) -> InboxEvent:
    """Decode an event from a gateway's inbox channel."""
    fields = _fields(body, "inbox event")
    kind = fields.get("kind")
    try:
        if kind == "pm":
            return PrivateDelivery(str(fields["key"]), str(fields["sender"]), str(fields["text"]))
        if kind == "kick":
            return UserKicked(str(fields["key"]), str(fields.get("reason") or ""))
    except KeyError as exc:
        raise EventDecodeError(f"inbox event lacks {exc}") from exc
    raise EventDecodeError(f"unknown inbox event kind {kind!r}")
