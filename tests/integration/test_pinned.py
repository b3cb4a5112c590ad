"""Cluster-pinned requests (InferRequest.cluster, FIRST's /resource_server/<cluster>/<framework>/v1)
and clusters under maintenance (``first cluster``): real routers, sim workers, a scaler with a
batch-queue double and a gateway on the session's nats-server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import aiohttp
import openai
import orjson
import pytest

from services.admin import clusters as admin_clusters
from services.gateway.app import create_app
from services.scaler.service import Scaler
from shared import errors, schema
from tests.integration.conftest import make_config, table_auth
from tests.integration.test_scaler import BatchQueueProvider
from tests.support import eventually

ANN = {"ann": schema.Identity(user="ann", kind="key")}


def chat(model: str = "m") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def two_clusters(subjects, **sections):
    return make_config(
        [{"id": "m"}, {"id": "only-a", "clusters": ["a"]}],
        nats={"subject_prefix": subjects.prefix},
        **sections,
    )


async def test_a_pinned_request_runs_only_on_its_cluster(services, subjects):
    config = two_clusters(subjects)
    router = await services.router(config)
    await services.worker(config, "m", cluster="a", worker_id="a-w1")
    await services.worker(config, "m", cluster="b", worker_id="b-w1")
    client = await services.client()
    assert router.registry.get("a-w1").beat.framework == "sim"  # heartbeats say what serves it
    for cluster, worker in (("b", "b-w1"), ("a", "a-w1")):
        for _ in range(6):
            result = await client.complete("m", "chat", chat(), cluster=cluster)
            assert result.worker_id == worker


async def test_a_pinned_request_waiting_for_a_cold_cluster_delays_no_unpinned_one(services, subjects):
    config = two_clusters(subjects)
    router = await services.router(config)
    await services.worker(config, "m", cluster="a", worker_id="a-w1")
    demand = await (await services.connect()).subscribe(subjects.demand)
    client = await services.client()

    async def pinned() -> schema.Token:
        return (await client.complete("m", "chat", chat(), cluster="b", queue_timeout_s=30)).worker_id

    waiting = asyncio.create_task(pinned())
    await eventually(lambda: len(router.pinned.get(("m", "b"), ())) == 1, what="the pinned request held")
    said = schema.demand_decoder.decode((await demand.next_msg(timeout=5)).data)
    assert (said.model, said.cluster, said.queued) == ("m", "b", 1)  # the scaler learns where

    started = time.monotonic()
    for _ in range(8):  # each waits behind no one: cluster a serves them at once
        assert (await client.complete("m", "chat", chat())).worker_id == "a-w1"
    assert time.monotonic() - started < 5 and not waiting.done()
    assert len(router.queues["m"]) == 0

    await services.worker(config, "m", cluster="b", worker_id="b-w1")
    assert await asyncio.wait_for(waiting, timeout=10) == "b-w1"


async def test_requests_waiting_for_a_cold_cluster_do_not_fill_the_queue_of_the_rest(services, subjects):
    """``router.max_queue`` bounds each queue: two requests pinned to cold b fill theirs, and one that
    any cluster may serve still waits for busy a's slot instead of getting 503."""
    config = make_config(
        [{"id": "m", "capacity": 1, "engine": {"kind": "sim", "ttft_ms": 300, "itl_ms": 1}}],
        nats={"subject_prefix": subjects.prefix},
        router={"max_queue": 2, "queue_timeout_s": 30},
    )
    router = await services.router(config)
    await services.worker(config, "m", cluster="a", worker_id="a-w1")
    client = await services.client()
    cold = [asyncio.create_task(client.complete("m", "chat", chat(), cluster="b")) for _ in range(2)]
    await eventually(lambda: len(router.pinned.get(("m", "b"), ())) == 2, what="two held for b")
    with pytest.raises(errors.NoCapacity):  # b's own queue is full
        await client.complete("m", "chat", chat(), cluster="b")
    results = await asyncio.gather(*(client.complete("m", "chat", chat()) for _ in range(2)))
    assert [r.worker_id for r in results] == ["a-w1", "a-w1"]  # one ran, one waited its turn
    for task in cold:
        task.cancel()
    await asyncio.gather(*cold, return_exceptions=True)


async def test_requests_pinned_and_not_waiting_for_one_cluster_are_served_oldest_first(services, subjects):
    """A worker that comes up takes from its cluster's pinned queue and the model's queue alike, the
    older request first: neither kind waits behind the other's queue."""
    slow = {"kind": "sim", "ttft_ms": 1, "itl_ms": 100, "default_max_tokens": 100}
    config = make_config(
        [{"id": "m", "capacity": 1, "engine": slow}], nats={"subject_prefix": subjects.prefix}
    )
    router = await services.router(config)
    await services.worker(config, "m", cluster="a", worker_id="a-w1")
    client = await services.client()
    long = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})
    finished: list[str] = []

    async def send(name: str, **kw) -> str:
        result = await client.complete("m", "chat", chat(), queue_timeout_s=30, **kw)
        finished.append(name)
        return result.worker_id

    async with client.open("m", "chat", long) as busy:  # holds a-w1's only slot
        await anext(aiter(busy))
        pinned_old = asyncio.create_task(send("pinned-old", cluster="b"))
        await eventually(lambda: len(router.pinned.get(("m", "b"), ())) == 1, what="pinned held")
        unpinned = asyncio.create_task(send("unpinned"))
        await eventually(lambda: len(router.queues["m"]) == 1, what="unpinned held")
        pinned_new = asyncio.create_task(send("pinned-new", cluster="b"))
        await eventually(lambda: len(router.pinned[("m", "b")]) == 2, what="second pinned held")
        await services.worker(config, "m", cluster="b", worker_id="b-w1")
        workers = await asyncio.wait_for(asyncio.gather(pinned_old, unpinned, pinned_new), timeout=15)
    assert workers == ["b-w1"] * 3
    assert finished == ["pinned-old", "unpinned", "pinned-new"]


async def test_a_pinned_request_for_a_cluster_without_the_model_is_firsts_404(services, subjects):
    config = two_clusters(subjects)
    await services.router(config)
    client = await services.client()
    for cluster in ("b", "nowhere"):
        with pytest.raises(errors.FirstError) as caught:
            await client.complete("only-a", "chat", chat("only-a"), cluster=cluster)
        assert (caught.value.status, caught.value.code) == (404, "endpoint_not_found")
        assert caught.value.message == f"The requested endpoint '{cluster}-sim-only-a' does not exist."


async def test_the_scaler_starts_a_node_in_the_cluster_a_request_is_pinned_to(services, subjects):
    config = make_config(
        [{"id": "m", "scaling": {"max_workers": 2}}],
        nats={"subject_prefix": subjects.prefix},
        scaler={"tick_s": 0.05},
    )
    await services.router(config)
    providers = {"a": BatchQueueProvider(), "b": BatchQueueProvider()}
    scaler = Scaler(await services.connect(), subjects, config, providers)
    await services.stack.enter_async_context(scaler)
    client = await services.client()
    waiting = asyncio.create_task(client.complete("m", "chat", chat(), cluster="b", queue_timeout_s=30))
    try:
        await eventually(lambda: providers["b"].requested, what="a node requested in cluster b")
        await asyncio.sleep(0.3)  # more ticks: the node asked for is counted, nothing more starts
        assert [s.cluster for s in providers["b"].requested] == ["b"] and not providers["a"].requested
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting


# --- maintenance ----------------------------------------------------------------------------------


async def cluster_cli(capsys, nats_url, config, *argv: str) -> tuple[int, str]:
    args = argparse.Namespace(nats=nats_url, credentials="", json=False, message="")
    args.action = argv[0]
    if args.action == "maintenance":
        args.name, args.state = argv[1], argv[2]
        if len(argv) > 3:
            args.message = argv[3]
    rc = await admin_clusters.main(config, args)
    return rc, capsys.readouterr().out


async def test_the_cli_puts_a_cluster_under_maintenance_and_back(services, subjects, nats_url, capsys):
    config = two_clusters(subjects)
    rc, out = await cluster_cli(capsys, nats_url, config, "list")
    assert rc == 0 and [line.split()[:3] for line in out.splitlines()[1:]] == [
        ["a", "in", "service"],
        ["b", "in", "service"],
    ]
    rc, _ = await cluster_cli(capsys, nats_url, config, "maintenance", "b", "on", "Disk upgrade until 5 pm.")
    assert rc == 0
    _, out = await cluster_cli(capsys, nats_url, config, "list")
    assert out.splitlines()[2].split(None, 2) == ["b", "maintenance", "Disk upgrade until 5 pm."]
    assert (await cluster_cli(capsys, nats_url, config, "maintenance", "b", "off"))[0] == 0
    _, out = await cluster_cli(capsys, nats_url, config, "list")
    assert "maintenance" not in out
    assert (await cluster_cli(capsys, nats_url, config, "maintenance", "nowhere", "on"))[0] == 2


async def test_federated_requests_avoid_a_cluster_under_maintenance(services, subjects, nats_url, capsys):
    config = two_clusters(subjects)
    router = await services.router(config)
    await services.worker(config, "m", cluster="a", worker_id="a-w1")
    await services.worker(config, "m", cluster="b", worker_id="b-w1")
    client = await services.client()
    await cluster_cli(capsys, nats_url, config, "maintenance", "a", "on")
    await eventually(lambda: router.registry.maintenance == {"a"}, what="the router to follow the bucket")
    for _ in range(8):
        assert (await client.complete("m", "chat", chat())).worker_id == "b-w1"
    with pytest.raises(errors.FirstError) as caught:  # a NATS caller pinned to it: refused too
        await client.complete("m", "chat", chat(), cluster="a")
    assert (caught.value.status, caught.value.code) == (503, "cluster_under_maintenance")
    await cluster_cli(capsys, nats_url, config, "maintenance", "a", "off")
    await eventually(lambda: not router.registry.maintenance, what="the router to see it back")
    assert (await client.complete("m", "chat", chat(), cluster="a")).worker_id == "a-w1"


@pytest.fixture
async def gateway(services, subjects):
    config = make_config(
        [{"id": "m"}, {"id": "only-a", "clusters": ["a"]}],
        nats={"subject_prefix": subjects.prefix},
        auth={"methods": ["keys"]},
        limits={"user": {"requests_per_s": 1000}},
    )
    await services.router(config)
    await services.worker(config, "m", cluster="a", worker_id="a-w1")
    await services.worker(config, "m", cluster="b", worker_id="b-w1")
    app = create_app(config, services.nats_url)
    table_auth(app, ANN)
    url = await services.gateway(app)
    async with aiohttp.ClientSession(base_url=url, headers={"Authorization": "Bearer ann"}) as http:
        yield url, http, config


async def _post(http, path: str, model: str = "m") -> tuple[int, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with http.post(path, json=body) as r:
        return r.status, await r.json()


async def test_firsts_pinned_paths_with_the_openai_sdk(gateway):
    url, _, _ = gateway
    for cluster in ("a", "b"):
        sdk = openai.AsyncOpenAI(
            base_url=f"{url}/resource_server/{cluster}/sim/v1", api_key="ann", max_retries=0
        )
        try:
            for _ in range(3):
                reply = await sdk.chat.completions.with_raw_response.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
                assert reply.parse().usage.completion_tokens == 2
            done = await sdk.completions.create(model="m", prompt="once", max_tokens=2)
            assert done.usage.completion_tokens == 2
        finally:
            await sdk.close()


async def test_firsts_pinned_paths_check_in_firsts_order(gateway):
    _, http, _ = gateway
    status, body = await _post(http, "/resource_server/nowhere/sim/v1/chat/completions")
    assert (status, body["error"]["code"]) == (404, "cluster_not_found")
    assert body["error"]["message"] == "The requested cluster 'nowhere' does not exist."
    status, body = await _post(http, "/resource_server/a/vllm/v1/chat/completions")
    assert (status, body["error"]["code"]) == (400, "unsupported_framework")
    assert body["error"]["message"] == "framework vllm not available on cluster a."
    status, body = await _post(http, "/resource_server/b/sim/v1/chat/completions", "only-a")
    assert (status, body["error"]["code"]) == (404, "endpoint_not_found")
    assert body["error"]["message"] == "The requested endpoint 'b-sim-only-a' does not exist."
    assert (await _post(http, "/resource_server/b/sim/v1/chat/completions", "m"))[0] == 200


async def test_a_cluster_under_maintenance_at_the_gateway(gateway, nats_url, capsys):
    _, http, config = gateway
    message = "Sophia is down for its quarterly upgrade."
    await cluster_cli(capsys, nats_url, config, "maintenance", "b", "on", message)

    async def refused() -> dict | None:
        # The router refuses too, so ask with a framework b does not serve: only the gateway's own
        # check, which comes before the framework's, answers 503 there (FIRST's order).
        status, body = await _post(http, "/resource_server/b/vllm/v1/chat/completions")
        return body if status == 503 else None

    body = await eventually(refused, what="the gateway to refuse the cluster under maintenance")
    assert body["error"]["code"] == "cluster_under_maintenance" and body["error"]["message"] == message
    status, body = await _post(http, "/resource_server/b/sim/v1/chat/completions")
    assert (status, body["error"]["message"]) == (503, message)
    async with http.get("/resource_server/status") as r:
        assert await r.json() == {"a": True, "b": False}
    async with http.get("/resource_server/b/jobs") as r:
        jobs = await r.json()
    assert jobs["stopped"] == [{"Models": "m", "Framework": "sim", "Cluster": "b", "Model Status": "stopped"}]
    assert jobs["running"] == jobs["queued"] == jobs["others"] == []
    assert (await _post(http, "/resource_server/v1/chat/completions"))[0] == 200  # federated: cluster a
    await cluster_cli(capsys, nats_url, config, "maintenance", "b", "off")

    async def back() -> bool:
        return (await _post(http, "/resource_server/b/sim/v1/chat/completions"))[0] == 200

    await eventually(back, what="the cluster back in service")
