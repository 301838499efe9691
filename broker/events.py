"""Room events as they travel on the bus, and their encoding.

Every event is appended to the room stream and published in the same atomic step, so each
carries its stream id: the id orders events cluster-wide and lets a gateway that lost its
subscription replay exactly what it missed and drop what it already delivered.

On the pub/sub channel a message is ``<stream id> <JSON>``; in the stream the JSON is the
field ``d`` of the entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from broker.errors import EventDecodeError


@dataclass(frozen=True, slots=True)
class ChatMessage:
    id: str
    name: str
    text: str


@dataclass(frozen=True, slots=True)
class UserJoined:
    id: str
    name: str
    gateway: str
    session: str
    online: int


@dataclass(frozen=True, slots=True)
class UserLeft:
    id: str
    name: str
    gateway: str
    session: str


@dataclass(frozen=True, slots=True)
class Announcement:
    """A system line from an operator, for every user."""

    id: str
    text: str


@dataclass(frozen=True, slots=True)
class UserKicked:
    """An operator asked the gateway holding ``session`` to disconnect it."""

    id: str
    name: str
    gateway: str
    session: str
    reason: str


RoomEvent = ChatMessage | UserJoined | UserLeft | Announcement | UserKicked


def encode_message(name: str, text: str) -> str:
    """The JSON body of a chat message (the id is added by Redis when it is appended)."""
    return json.dumps({"kind": "msg", "name": name, "text": text})


def encode_announcement(text: str) -> str:
    return json.dumps({"kind": "notice", "text": text})


def stream_id_key(event_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair; ids are ``<milliseconds>-<sequence>``."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def decode_bus_message(data: bytes | str) -> RoomEvent:
    """Decode ``<stream id> <JSON>`` from the pub/sub channel."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    event_id, _, body = data.partition(" ")
    try:
        stream_id_key(event_id)
    except ValueError:
        raise EventDecodeError(f"not a stream id: {event_id[:40]!r}") from None
    return decode_event(event_id, body)


def decode_event(event_id: str, body: str | bytes) -> RoomEvent:
    """Decode the JSON body of the event with stream id ``event_id``."""
    try:
        fields: dict[str, Any] = json.loads(body)
        kind = fields["kind"]
        if kind == "msg":
            return ChatMessage(event_id, str(fields["name"]), str(fields["text"]))
        if kind == "join":
            return UserJoined(
                event_id,
                str(fields["name"]),
                str(fields["gateway"]),
                str(fields["session"]),
                int(fields["online"]),
            )
        if kind == "leave":
            return UserLeft(
                event_id, str(fields["name"]), str(fields["gateway"]), str(fields["session"])
            )
        if kind == "notice":
            return Announcement(event_id, str(fields["text"]))
        if kind == "kick":
            return UserKicked(
                event_id,
                str(fields["name"]),
                str(fields["gateway"]),
                str(fields["session"]),
                str(fields.get("reason") or ""),
            )
    except (ValueError, KeyError, TypeError) as exc:
        raise EventDecodeError(f"undecodable event {event_id}: {exc}") from exc
    raise EventDecodeError(f"unknown event kind {kind!r} in {event_id}")
