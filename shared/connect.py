"""One way to connect to NATS for every service: reconnect forever, and report trouble as log lines."""

from __future__ import annotations

import contextlib

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NATS


async def connect(url: str, name: str) -> NATS:
    log = structlog.get_logger().bind(nats_client=name)

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=repr(exc))

    async def on_disconnect() -> None:
        log.info("nats_disconnected")

    async def on_reconnect() -> None:
        log.info("nats_reconnected")

    return await nats.connect(
        url,
        name=name,
        connect_timeout=5,
        max_reconnect_attempts=-1,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )


async def close(nc: NATS) -> None:
    """Drain (deliver what is pending, then close); a server already gone just closes."""
    try:
        await nc.drain()
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        structlog.get_logger().info("nats_closed_without_drain", reason=repr(exc))
        await nc.close()


async def unsubscribe(subs: list) -> None:
    """End these subscriptions (a connection already closed has ended them) and empty the list."""
    for sub in subs:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    subs.clear()
