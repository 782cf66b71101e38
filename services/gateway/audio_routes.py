"""Placeholder: routes are added by the speech work."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()
