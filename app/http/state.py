"""Typed keys of what the application holds."""

from __future__ import annotations

from aiohttp import web

from app.hub import Hub
from app.settings import Settings
from app.store import GenerationLog
from app.telemetry.web import TELEMETRY

SETTINGS = web.AppKey("settings", Settings)
LOG = web.AppKey("log", GenerationLog)
HUB = web.AppKey("hub", Hub)

__all__ = ["HUB", "LOG", "SETTINGS", "TELEMETRY"]
