"""Typed keys of what the application holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from app.access import Access
from app.hub import Hub
from app.settings import Settings
from app.store import GenerationLog
from app.telemetry.web import TELEMETRY

if TYPE_CHECKING:
    from app.http.connection import OpenStreams

SETTINGS = web.AppKey("settings", Settings)
LOG = web.AppKey("log", GenerationLog)
HUB = web.AppKey("hub", Hub)
ACCESS = web.AppKey("access", Access)
# The reader's open event streams (`app.http.connection.OpenStreams`).
OPEN_STREAMS: web.AppKey[OpenStreams] = web.AppKey("open_streams")

__all__ = ["ACCESS", "HUB", "LOG", "OPEN_STREAMS", "SETTINGS", "TELEMETRY"]
