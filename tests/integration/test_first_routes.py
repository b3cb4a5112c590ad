"""FIRST's /resource_server paths, as its users' scripts call them (../shared/reference/first-api.md,
sections 1 and 5): a real gateway, router and sim workers on the session's nats-server; callers
are identities from a table (tests/integration/conftest.py TableAuth)."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import openai
import orjson
import pytest

from services.gateway.app import create_app
from shared import schema
from tests.integration.conftest import make_config, table_auth
from tests.support import eventually

PEOPLE = {
    "ann": schema.Identity(user="ann", kind="key"),
    "sam": schema.Identity(user="sam", kind="key", groups=["staff"]),
}


def federation(subjects):
    return make_config(
        [
            {"id": "Open-Model", "tokens_per_min": 5000, "aliases": ["legacy/open"]},  # on both clusters
            {"id": "cold", "clusters": ["b"], "engine": {"kind": "sim", "load_s": 60}},  # loads for long
            {"id": "staff-only", "clusters": ["a"], "allowed_groups": ["staff"]},
        ],
        nats={"subject_prefix": subjects.prefix},
        auth={"methods": ["keys"]},
        clusters=[
            {"name": "a", "max_nodes": 3},
            {"name": "b"},
            {"name": "vault", "allowed_groups": ["staff"]},
        ],
        limits={"user": {"model_tokens_per_min": 600}},
    )


@pytest.fixture
async def gateway(services, subjects):
    config = federation(subjects)
    await services.router(config)
    await services.worker(config, "Open-Model", cluster="a", worker_id="a-w1")
    app = create_app(config, services.nats_url)
    table_auth(app, PEOPLE)
    url = await services.gateway(app)
    async with aiohttp.ClientSession(base_url=url) as http:

        async def get(path: str, who: str = "ann") -> tuple[int, object]:
            async with http.get(path, headers={"Authorization": f"Bearer {who}"}) as r:
                return r.status, await r.json()

        get.url = url
        yield get


async def test_health_and_status_need_no_credential_and_show_only_open_clusters(gateway):
    async with aiohttp.ClientSession(base_url=gateway.url) as http:
        async with http.get("/resource_server/health") as r:
            assert (r.status, await r.json()) == (200, {"status": "ok"})
        async with http.get("/resource_server/status") as r:
            assert (r.status, await r.json()) == (200, {"a": True, "b": True})


async def test_list_endpoints_has_firsts_shape_and_only_what_the_caller_may_use(gateway):
    status, body = await gateway("/resource_server/list-endpoints")
    assert status == 200
    endpoints = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    assert body == {
        "clusters": {
            "a": {
                "base_url": "/resource_server/a",
                "frameworks": {"sim": {"models": ["Open-Model"], "endpoints": endpoints}},
            },
            "b": {
                "base_url": "/resource_server/b",
                "frameworks": {"sim": {"models": ["Open-Model", "cold"], "endpoints": endpoints}},
            },
        }
    }
    _, staff = await gateway("/resource_server/list-endpoints", "sam")
    assert staff["clusters"]["a"]["frameworks"]["sim"]["models"] == ["Open-Model", "staff-only"]
    assert set(staff["clusters"]) == {"a", "b", "vault"}


async def test_a_clusters_models_sorted_with_their_token_limits_or_one_by_id(gateway):
    status, body = await gateway("/resource_server/b/models")
    assert status == 200
    assert body == [
        {
            "id": "cold",
            "object": "model",
            "cluster": "b",
            "framework": "sim",
            "rate_limit_token_per_minute": 100000,
            "rate_limit_token_per_minute_per_user": 600,
        },
        {
            "id": "Open-Model",
            "object": "model",
            "cluster": "b",
            "framework": "sim",
            "rate_limit_token_per_minute": 5000,
            "rate_limit_token_per_minute_per_user": 600,
        },
    ]  # fmt: skip  (sorted as FIRST does: by the lowercased id)
    status, body = await gateway("/resource_server/b/models?model_id=cold")
    assert status == 200 and [m["id"] for m in body] == ["cold"]
    status, body = await gateway("/resource_server/b/models?model_id=nope")
    assert status == 404 and body["error"]["code"] == "endpoint_not_found"
    assert body["error"]["message"] == "nope model not found on cluster b."


async def test_an_unknown_or_closed_cluster_is_firsts_404(gateway):
    for path in ("/resource_server/nowhere/models", "/resource_server/vault/jobs"):
        status, body = await gateway(path)
        assert status == 404 and body["error"]["code"] == "cluster_not_found", path
    assert (await gateway("/resource_server/vault/jobs", "sam"))[0] == 200


async def test_jobs_show_running_workers_stopped_models_and_free_nodes(gateway):
    async def running() -> dict | None:
        status, body = await gateway("/resource_server/a/jobs", "sam")
        return body if status == 200 and body["running"] else None

    body = await eventually(running, what="the worker on cluster a to show as a running job")
    assert body["running"] == [
        {"Models": "Open-Model", "Framework": "sim", "Cluster": "a", "Model Status": "running",
         "Job ID": "a-w1", "Job State": "R"}
    ]  # fmt: skip
    assert body["stopped"] == [
        {"Models": "staff-only", "Framework": "sim", "Cluster": "a", "Model Status": "stopped"}
    ]
    assert (
        body["queued"]
        == body["others"]
        == body["private_batch_running"]
        == body["private_batch_queued"]
        == []
    )
    assert body["cluster_status"] == {"free_nodes": 2}

    status, body = await gateway("/resource_server/b/jobs")
    assert status == 200 and body["running"] == []
    assert [j["Models"] for j in body["stopped"]] == ["Open-Model", "cold"]


async def test_a_worker_still_loading_its_model_is_a_starting_job(gateway, services, subjects):
    # Its start returns once the model is loaded (60 s): it beats "loading" meanwhile.
    loading = asyncio.create_task(
        services.worker(federation(subjects), "cold", cluster="b", worker_id="b-w1")
    )
    try:

        async def starting() -> dict | None:
            status, body = await gateway("/resource_server/b/jobs")
            return body if status == 200 and body["running"] else None

        body = await eventually(starting, what="the loading worker to show as a job")
        assert body["running"] == [
            {"Models": "cold", "Framework": "sim", "Cluster": "b", "Model Status": "starting",
             "Job ID": "b-w1", "Job State": "R"}
        ]  # fmt: skip
        assert [j["Models"] for j in body["stopped"]] == ["Open-Model"]
    finally:
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading


async def test_a_model_whose_requests_wait_with_no_worker_is_a_queued_job(gateway):
    client = openai.AsyncOpenAI(base_url=gateway.url + "/resource_server/v1", api_key="ann", max_retries=0)
    waiting = asyncio.create_task(
        client.chat.completions.create(model="cold", messages=[{"role": "user", "content": "hi"}])
    )  # no scaler here: the router holds it
    try:

        async def queued() -> dict | None:
            status, body = await gateway("/resource_server/b/jobs")
            return body if status == 200 and body["queued"] else None

        body = await eventually(queued, what="the held request to show its model as queued")
        assert body["queued"] == [
            {"Models": "cold", "Framework": "sim", "Cluster": "b", "Model Status": "queued", "Job State": "Q"}
        ]
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await client.close()


async def test_the_openai_sdk_with_firsts_federated_base_url(gateway):
    client = openai.AsyncOpenAI(base_url=gateway.url + "/resource_server/v1", api_key="ann", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="Open-Model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 3
        done = await client.completions.create(model="Open-Model", prompt="once", max_tokens=2)
        assert done.usage.completion_tokens == 2
        # /resource_server/v1/embeddings (the SDK asks for base64 and decodes it): the sim's vectors.
        vectors = await client.embeddings.create(model="Open-Model", input=["a cat", "a dog"])
        assert [d.index for d in vectors.data] == [0, 1] and vectors.model == "Open-Model"
        assert [len(d.embedding) for d in vectors.data] == [64, 64]  # the sim's embedding_dims
        assert vectors.data[0].embedding != vectors.data[1].embedding and vectors.usage.prompt_tokens > 0
    finally:
        await client.close()


async def test_an_alias_is_served_as_its_model_over_http_and_nats(gateway, services):
    """FIRST keeps legacy names working: the answer, the limits and the workers know the id."""
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="ann", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="legacy/open", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.model == "Open-Model" and reply.usage.completion_tokens == 2
        assert [m.id for m in (await client.models.list()).data] == ["Open-Model", "cold"]
    finally:
        await client.close()
    usage = await (await services.connect()).subscribe(services.subjects.usage)
    native = await services.client()
    result = await native.complete(
        "legacy/open", "chat", orjson.dumps({"messages": [{"role": "user", "content": "x"}]})
    )
    assert result.worker_id == "a-w1"
    record = schema.usage_decoder.decode((await usage.next_msg(timeout=5)).data)  # the only run since
    assert record.model == "Open-Model"  # routers serve an alias as its id: usage and queues know it


async def test_embeddings_on_firsts_pinned_path(gateway):
    client = openai.AsyncOpenAI(
        base_url=gateway.url + "/resource_server/a/sim/v1", api_key="ann", max_retries=0
    )
    wrong = openai.AsyncOpenAI(
        base_url=gateway.url + "/resource_server/a/vllm/v1", api_key="ann", max_retries=0
    )
    try:
        reply = await client.embeddings.create(model="Open-Model", input=["x", "y z"])
        assert [d.index for d in reply.data] == [0, 1] and reply.model == "Open-Model"
        with pytest.raises(openai.BadRequestError) as caught:
            await wrong.embeddings.create(model="Open-Model", input="x")
        assert caught.value.body["code"] == "unsupported_framework"
    finally:
        await client.close()
        await wrong.close()


async def test_jobs_show_the_scalers_nodes_with_firsts_job_fields(gateway, services, nc, subjects):
    """A node the scaler asked for is a job: queued with the batch system's reason while it waits,
    then starting while its worker loads, with its job id, state, workers and nodes reserved."""
    from services.scaler.service import Scaler
    from tests.integration.test_scaler_table import TableProvider, demand

    config = federation(subjects)
    provider = TableProvider()
    scaler = Scaler(await services.connect(), subjects, config, {"b": provider})
    await services.stack.enter_async_context(scaler)
    await demand(nc, subjects, "cold", 1)
    [spec] = await eventually(lambda: provider.requested, what="a node for cold on b")
    provider.set(spec.node_id, "queued", "Priority")

    async def listed(kind: str, status: str, job_state: str) -> list | None:
        code, body = await gateway("/resource_server/b/jobs")
        found = body.get(kind, []) if code == 200 else []
        return (
            found
            if found and (found[0]["Model Status"], found[0]["Job State"]) == (status, job_state)
            else None
        )

    queued = await eventually(lambda: listed("queued", "queued", "QUEUED"), what="the queued job")
    assert queued == [
        {"Models": "cold", "Framework": "sim", "Cluster": "b", "Model Status": "queued",
         "Job ID": f"job-{spec.node_id}", "Job State": "QUEUED", "Node ID": spec.node_id, "Workers": "b-n0",
         "Nodes Reserved": 1, "Job Comments": "Priority"}
    ]  # fmt: skip

    provider.set(spec.node_id, "running")
    loading = asyncio.create_task(
        services.worker(config, "cold", cluster="b", worker_id=spec.workers[0], node_id=spec.node_id)
    )
    try:
        [job] = await eventually(lambda: listed("running", "starting", "RUNNING"), what="the worker loading")
        assert (job["Job ID"], job["Workers"]) == (f"job-{spec.node_id}", "b-n0")
        _, body = await gateway("/resource_server/b/jobs")
        assert body["queued"] == [] and [j["Models"] for j in body["stopped"]] == ["Open-Model"]
        assert body["cluster_status"] == {"free_nodes": 7}  # b's 8 slots, one held by the node
    finally:
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
