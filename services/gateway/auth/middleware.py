"""Every API request carries a credential that an authenticator accepts, unless the deployment is
open (``auth.methods = ["none"]``); the identity behind it goes with the request, to the engine's
worker, the limits and the usage records."""

from __future__ import annotations

from aiohttp import web

from services.gateway import keys
from services.gateway.auth.base import Authenticator
from services.gateway.auth.credentials import bearer
from services.gateway.auth.failures import FailureGuard, claimant, identify
from services.gateway.middleware import Handler
from shared import schema

# /status is the status page's HTML: its data (/status.json) asks for a key like the API.
PUBLIC = frozenset(
    {"/health", "/openapi.json", "/resource_server/health", "/resource_server/status", "/status"}
    | {"/metrics"}  # Prometheus scrapes without a credential; it shows counts, no caller's identity
)


async def auth_ctx(app: web.Application):
    """The authenticators the config names, started after the NATS connection they may need."""
    config = app[keys.CONFIG]
    authenticators: list[Authenticator] = []
    if "keys" in config.auth.methods:
        from services.gateway.auth.keys import KeyAuthenticator

        authenticators.append(KeyAuthenticator(app[keys.NC], config))
    if "globus" in config.auth.methods:
        from services.gateway.auth.globus import GlobusAuthenticator

        authenticators.append(GlobusAuthenticator(config.auth.globus))
    started: list[Authenticator] = []
    try:
        for authenticator in authenticators:
            await authenticator.start()
            started.append(authenticator)
        app[keys.AUTHENTICATORS] = authenticators
        app[keys.AUTH_FAILURES] = FailureGuard(
            authenticators, config.auth.max_failures_per_min, config.gateway.trusted_proxies
        )
        yield
    finally:
        for authenticator in reversed(started):
            await authenticator.stop()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    authenticators = request.app[keys.AUTHENTICATORS]
    if not authenticators or request.path in PUBLIC:
        request[keys.IDENTITY] = schema.ANONYMOUS
        return await handler(request)
    credential = bearer(request)
    guard = request.app.get(keys.AUTH_FAILURES)  # absent where a test sets the authenticators
    if guard is not None:
        request[keys.IDENTITY] = await guard.identify(request, credential)
    else:
        request[keys.IDENTITY] = await identify(claimant(authenticators, credential), credential)
    return await handler(request)
