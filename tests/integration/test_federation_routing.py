"""A simulated federation under skewed load, through a real router and sim workers on three
clusters: requests go where capacity is, and a cluster whose heartbeats went stale is not chosen
while another can serve (docs/protocol.md, "How a router chooses")."""

from __future__ import annotations

import asyncio
import collections

import orjson

from shared import schema
from tests.integration.conftest import make_config
from tests.support import eventually

SLOW = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})


def federation(**model):
    return make_config(
        [{"id": "m", "engine": {"kind": "sim", "ttft_ms": 200, "itl_ms": 20, "max_concurrency": 8}, **model}],
        clusters=[{"name": "small"}, {"name": "big"}, {"name": "far"}],
        worker={"heartbeat_s": 0.2},
        router={"queue_timeout_s": 30},
    )


async def test_requests_go_where_the_capacity_is(services):
    """One free slot on 'small', six on 'big': of seven requests at once, six run on 'big'."""
    small, big = federation(capacity=1), federation(capacity=6)
    router = await services.router(big)
    await services.worker(small, "m", cluster="small", worker_id="small-1")
    await services.worker(big, "m", cluster="big", worker_id="big-1")
    await eventually(
        lambda: router.registry.get("small-1") and router.registry.get("big-1"), what="both heard"
    )
    client = await services.client(request_timeout_s=30)
    results = await asyncio.gather(*(client.complete("m", "chat", SLOW) for _ in range(7)))
    assert collections.Counter(r.worker_id for r in results) == {"big-1": 6, "small-1": 1}


async def test_a_stale_cluster_is_passed_over_while_a_fresh_one_can_serve(services, nc, subjects):
    """'far' has the emptiest worker, but its last heartbeat is older than 1.5 intervals (its site
    is cut off): requests go to 'big' instead, although 'far' is not forgotten yet."""
    config = federation(capacity=4)
    router = await services.router(config)
    await services.worker(config, "m", cluster="big", worker_id="big-1")
    dispatched: list = []

    async def on_dispatch(msg):
        dispatched.append(msg)

    await nc.subscribe(subjects.worker_infer("far-1"), cb=on_dispatch)
    beat = schema.Heartbeat("far-1", "far", "m", "ready", 64, 0, 1.0)  # many free slots, then silence
    await nc.publish(subjects.heartbeat("far", "far-1"), schema.encode(beat))
    await eventually(lambda: router.registry.get("far-1") is not None, what="far-1 heard")
    await asyncio.sleep(1.6)  # > 1.5 x its 1 s interval: stale; forgotten only after 3 s
    assert router.registry.get("far-1") is not None
    client = await services.client(request_timeout_s=30)
    results = await asyncio.gather(*(client.complete("m", "chat", SLOW) for _ in range(3)))
    assert {r.worker_id for r in results} == {"big-1"} and dispatched == []
