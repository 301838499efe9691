"""The web port: the chat page and the line protocol over WebSocket (PROTOCOL.md)."""

from gateway.web.server import WebServer

__all__ = ["WebServer"]
