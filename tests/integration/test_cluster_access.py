"""A cluster's allowed groups bind every request, not only FIRST's pinned paths: a model served on
an open cluster (a) and a staff-only one (b) never sends an outsider's request to b, whether it
comes through the gateway's /v1 path, the federated FIRST path or straight from NATS."""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import orjson
import pytest

from services.gateway.app import create_app
from shared import errors, schema
from tests.integration.conftest import make_config, table_auth
from tests.support import eventually

PEOPLE = {
    "ann": schema.Identity(user="ann", kind="key", groups=["physics"]),
    "sam": schema.Identity(user="sam", kind="key", groups=["staff"]),
}
BODY = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def config(prefix: str, **router):
    return make_config(
        [{"id": "m", "engine": {"kind": "sim", "ttft_ms": 20, "itl_ms": 5}, "capacity": 8}],
        clusters=[{"name": "a"}, {"name": "b", "allowed_groups": ["staff"]}],
        nats={"subject_prefix": prefix},
        auth={"methods": ["keys"]},
        limits={"user": {"requests_per_s": 0, "model_tokens_per_min": 0}},  # a burst is the test
        router={"queue_timeout_s": 30, **router},
    )


async def both_heard(router):
    await eventually(lambda: router.registry.get("a-1") and router.registry.get("b-1"), what="both workers")


async def test_an_outsiders_requests_all_go_to_the_cluster_open_to_them(services, nc, subjects):
    c = config(subjects.prefix)
    router = await services.router(c)
    await services.worker(c, "m", cluster="a", worker_id="a-1")
    await services.worker(c, "m", cluster="b", worker_id="b-1")
    await both_heard(router)
    served: list[schema.UsageRecord] = []

    async def on_usage(msg):
        served.append(schema.usage_decoder.decode(msg.data))

    await nc.subscribe(subjects.usage, cb=on_usage)
    app = create_app(c, services.nats_url)
    table_auth(app, PEOPLE)
    url = await services.gateway(app)
    async with aiohttp.ClientSession() as http:

        async def ask(who: str, path: str) -> int:
            async with http.post(
                url + path, data=BODY.replace(b"{", b'{"model":"m",', 1),
                headers={"Authorization": f"Bearer {who}", "Content-Type": "application/json"},
            ) as r:  # fmt: skip
                await r.read()
                return r.status

        paths = ["/v1/chat/completions", "/resource_server/v1/chat/completions"]
        statuses = await asyncio.gather(
            *(ask(who, p) for who in ("ann", "sam") for p in paths for _ in range(12))
        )
        assert set(statuses) == {200}
        # FIRST's pinned path: a cluster closed to the caller is one they cannot see
        assert await ask("ann", "/resource_server/b/sim/v1/chat/completions") == 404
    await eventually(lambda: len(served) == 48, what="48 usage records")
    where = collections.Counter((r.identity.user, r.cluster) for r in served)
    assert where[("ann", "a")] == 24 and where[("ann", "b")] == 0
    assert where[("sam", "b")] > 0  # the least-loaded choice spreads sam's over both


async def test_an_outsider_waits_for_the_open_cluster_rather_than_use_the_closed_one(services, nc, subjects):
    """Only b has a worker: ann's request is held for a (and the scaler is asked for a node there),
    then refused when its queue time ends; sam's is served on b at once."""
    c = config(subjects.prefix, queue_timeout_s=1.0)
    router = await services.router(c)
    await services.worker(c, "m", cluster="b", worker_id="b-1")
    await eventually(lambda: router.registry.get("b-1"), what="b's worker")
    demand: list[schema.Demand] = []

    async def on_demand(msg):
        demand.append(schema.demand_decoder.decode(msg.data))

    await nc.subscribe(subjects.demand, cb=on_demand)
    client = await services.client(request_timeout_s=10)
    sam = await client.complete("m", "chat", BODY, identity=PEOPLE["sam"])
    assert sam.cluster == "b"
    with pytest.raises(errors.NoCapacity):
        await client.complete("m", "chat", BODY, identity=PEOPLE["ann"])
    assert any(d.cluster == "a" and d.queued for d in demand)


async def test_a_nats_native_caller_is_held_to_its_clusters_too(services):
    c = make_config(
        [{"id": "m", "engine": {"kind": "sim", "ttft_ms": 1, "itl_ms": 1}}],
        clusters=[{"name": "a"}, {"name": "b", "allowed_groups": ["staff"]}],
        nats={"clients": [{"name": "nat", "groups": ["physics"]}]},
        auth={"methods": ["keys"]},
    )
    router = await services.router(c)
    await services.worker(c, "m", cluster="a", worker_id="a-1")
    await services.worker(c, "m", cluster="b", worker_id="b-1")
    await both_heard(router)
    nat = await services.client(user="nat", request_timeout_s=10)
    results = [await nat.complete("m", "chat", BODY) for _ in range(6)]
    assert {r.cluster for r in results} == {"a"}
    with pytest.raises(errors.Forbidden) as refused:
        await nat.complete("m", "chat", BODY, cluster="b")
    assert "cluster 'b'" in refused.value.message
