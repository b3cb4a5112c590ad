"""The gateway on NATS's service API (shared/discovery.py): listed by ``nats micro ls`` and
``first services`` while it runs."""

from __future__ import annotations

from aiohttp import web

from services.gateway import keys
from shared.connect import close, connect
from shared.discovery import Registration
from shared.subjects import GATEWAY_SERVICE


async def discovery_ctx(app: web.Application):
    """Registered after the NATS connection is up (``_nats_ctx``), gone before it closes.

    Beside a router (``first up``) the gateway registers on a connection of its own: nats-server
    lets a connection answer a request it received once, and the router's registration on the
    shared connection answers the same discovery requests."""
    client, config = app[keys.CLIENT], app[keys.CONFIG]
    own = None
    if keys.LOCAL_ROUTER in app:
        own = await connect(app[keys.NATS_URL], "first-gateway-discovery", app[keys.NATS_CREDENTIALS])
    registration = Registration(
        own or app[keys.NC],
        client.subjects,
        GATEWAY_SERVICE,
        description="FIRST gateway: the OpenAI-compatible HTTP API",
        counters=lambda: {"requests_in_flight": client.in_flight, "models": [m.id for m in config.models]},
        metadata={"client_id": client.client_id},
    )
    await registration.start()
    try:
        yield
    finally:
        await registration.stop()
        if own is not None:
            await close(own)
