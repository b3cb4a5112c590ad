"""NATS reconnects as the metrics count them: a ``first gateway`` and a ``first exporter`` process
through a nats-server restart (same port and store)."""

from __future__ import annotations

import contextlib

import aiohttp
import pytest

from services.worker.engines.openai_server import free_port
from tests.scrape import scrape, value
from tests.support import eventually

pytestmark = pytest.mark.faults


async def test_a_nats_restart_is_one_reconnect_at_the_gateway_and_the_exporter(own_fleet, restartable_nats):
    fleet = own_fleet
    fleet.configure([{"id": "m", "engine": {"kind": "sim"}}])
    gateway = await fleet.gateway()
    port = free_port()
    await fleet.first("exporter", "exporter", "--port", str(port))
    targets = {
        "first_gateway_nats_reconnects_total": gateway.url + "/metrics",
        "first_exporter_nats_reconnects_total": f"http://127.0.0.1:{port}/metrics",
    }

    async def reconnects() -> dict[str, float | None]:
        counts = {}
        for metric, url in targets.items():
            with contextlib.suppress(aiohttp.ClientError):
                counts[metric] = value(await scrape(url), metric)
        return counts

    async def counted(n: int) -> bool:
        counts = await reconnects()
        return len(counts) == len(targets) and set(counts.values()) == {n}

    await eventually(lambda: counted(0), timeout=20, what="both serving, no reconnect yet")
    await restartable_nats.stop()
    await restartable_nats.start()
    await eventually(lambda: counted(1), timeout=20, what=f"one reconnect each: {fleet.report()}")
