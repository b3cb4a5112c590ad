"""The gateway's app factory: ``create_app(config, nats_url)``, with no side effects at import."""

from __future__ import annotations

from aiohttp import web

from services.gateway import (
    batches,
    embeddings,
    files,
    first_routes,
    handlers,
    keys,
    limits,
    openapi,
    status_page,
)
from services.gateway.auth import auth_ctx, auth_middleware
from services.gateway.discovery import discovery_ctx
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import request_middleware
from services.gateway.server import serve
from shared.client import FirstClient, LocalRouter
from shared.config import Config
from shared.connect import close, connect
from shared.events import EventPublisher
from shared.subjects import Subjects


async def _nats_ctx(app: web.Application):
    config = app[keys.CONFIG]
    local_router = app.get(keys.LOCAL_ROUTER)
    # Beside a router, one connection serves both: a worker's Started and its reply to the
    # router then arrive in one read.
    if local_router is not None:
        nc = local_router.nc
    else:
        nc = await connect(app[keys.NATS_URL], "first-gateway", app[keys.NATS_CREDENTIALS])
    client = FirstClient(
        nc,
        Subjects(config.nats.subject_prefix),
        request_timeout_s=config.gateway.request_timeout_s,
        stall_timeout_s=config.gateway.stall_timeout_s,
        missed_heartbeats=config.router.missed_heartbeats,
        max_buffered_bytes=config.gateway.max_buffered_bytes,
        local_router=local_router,
    )
    await client.start()
    app[keys.NC], app[keys.CLIENT] = nc, client
    app[keys.EVENTS] = events = EventPublisher(nc, client.subjects, f"gateway-{client.client_id}")
    await events.emit(
        "config", "loaded", models=[m.id for m in config.models], clusters=[c.name for c in config.clusters],
        auth=list(config.auth.methods),
    )  # fmt: skip
    yield
    await client.stop()
    if local_router is None:
        await close(nc)


def create_app(
    config: Config, nats_url: str, *, local_router: LocalRouter | None = None, credentials: str = ""
) -> web.Application:
    """The gateway; ``local_router``: a router running in this process, which gets the requests
    by a call rather than over NATS (``first up``); ``credentials``: its NATS credentials file."""
    app = web.Application(
        middlewares=[request_middleware, auth_middleware], client_max_size=config.gateway.max_body_bytes
    )
    app[keys.CONFIG] = config
    app[keys.MODELS] = config.model_names()  # ids and aliases
    app[keys.NATS_URL] = nats_url
    app[keys.NATS_CREDENTIALS] = credentials
    if local_router is not None:
        app[keys.LOCAL_ROUTER] = local_router
    app.cleanup_ctx.append(_nats_ctx)
    app.cleanup_ctx.append(discovery_ctx)  # nats micro ls, first services
    if config.metrics.gateway:
        app[keys.METRICS] = GatewayMetrics(config, lambda: app.get(keys.NC))
        app.router.add_get("/metrics", handlers.metrics)
    app.cleanup_ctx.append(auth_ctx)
    if limits.enabled(config):
        app.cleanup_ctx.append(limits.limits_ctx)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_post("/v1/embeddings", embeddings.embeddings)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/v1/whoami", handlers.whoami)
    app.router.add_get("/resource_server/whoami", handlers.first_whoami)
    # FIRST's federated paths: the routers choose the cluster, as for /v1.
    app.router.add_post("/resource_server/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/resource_server/v1/completions", handlers.completions)
    app.router.add_post("/resource_server/v1/embeddings", embeddings.embeddings)
    first_routes.add_routes(app)
    status_page.add_routes(app)  # /status, /status.json
    files.add_routes(app)  # batch mode: /v1/files, /v1/batches (docs/batch.md)
    batches.add_routes(app)
    app.router.add_get("/openapi.json", openapi.handler())
    return app


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve the app under the gateway's connection limits (server.py); a client that disconnects
    cancels its handler (and so its request)."""
    return await serve(app, host, port, app[keys.CONFIG].gateway)
