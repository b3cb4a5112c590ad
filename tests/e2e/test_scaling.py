"""The scaler under ``first up``: nodes come for demand, one node per unmet demand, idle ones go."""

from __future__ import annotations

import asyncio

import pytest

from shared import events, schema
from tests.support import eventually

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def node_events(sim_stack, first_client):
    """Every node event the scaler publishes while the test runs."""
    seen: list[schema.Event] = []

    async def on_event(msg):
        seen.append(events.decode(msg.data))

    sub = await first_client.nc.subscribe(sim_stack.subjects.node_events, cb=on_event)
    yield seen
    await sub.unsubscribe()


async def test_a_burst_for_a_cold_model_starts_one_node_not_one_per_request(oai, node_events):
    calls = [
        oai.chat.completions.create(model="sim/burst", messages=MESSAGES, max_tokens=2) for _ in range(3)
    ]
    answers = await asyncio.gather(*calls)  # 3 requests fit one worker's 4 slots
    assert [a.usage.completion_tokens for a in answers] == [2, 2, 2]
    requested = [e.node_id for e in node_events if e.model == "sim/burst" and e.name == "requested"]
    assert len(requested) == 1, f"nodes requested while one was loading: {requested}"


async def test_an_idle_worker_is_released(oai, first_client, node_events):
    answer = await oai.chat.completions.create(model="sim/brief", messages=MESSAGES, max_tokens=2)
    assert answer.usage.completion_tokens == 2

    async def offline():
        status = next(m for m in (await first_client.status()).models if m.id == "sim/brief")
        return status.state == "offline" and not status.workers

    await eventually(offline, timeout=10, what="the idle sim/brief worker to be released")

    def states():
        return [e.name for e in node_events if e.model == "sim/brief"]

    await eventually(lambda: states()[-1:] == ["released"], timeout=5, what="the node's released event")
    assert states() == ["requested", "running", "stopping", "released"]
