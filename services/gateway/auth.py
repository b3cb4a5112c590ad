"""Who may call the API. No authentication yet: every request passes.

This middleware is the one place where API keys and Globus Auth tokens will be checked; it runs
after the request id is bound and before any handler, and raises a FirstError subclass to refuse.
"""

from __future__ import annotations

from aiohttp import web

from services.gateway.middleware import Handler


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await handler(request)
