"""The gateway's GET /metrics as Prometheus scrapes it, before and after requests sent through the
openai SDK: a real gateway, router and sim worker on the session's nats-server. Callers log in with
the test-only table authenticator ("Bearer alice" is alice) so that the real limiter runs."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from services.gateway.app import create_app
from shared import schema
from tests.integration.conftest import make_config, table_auth
from tests.scrape import moved, scrape, value
from tests.support import eventually

NO_LIMITS = {"requests_per_s": 0, "model_requests_per_s": 0, "tokens_per_min": 0, "model_tokens_per_min": 0}
USERS = {name: schema.Identity(user=name, kind="key") for name in ("alice", "bob", "carol")}
MESSAGES = [{"role": "user", "content": "one two three"}]


def sdk(url: str, user: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=user, max_retries=0, timeout=20)


@pytest.fixture
async def gateway(services, subjects):
    """A gateway with a request limit of 2/s per user, a router and a sim worker in cluster a for
    model m; model idle has no worker (its requests wait)."""
    config = make_config(
        [{"id": "m", "engine": {"kind": "sim", "ttft_ms": 1, "itl_ms": 1}}, {"id": "idle"}],
        nats={"subject_prefix": subjects.prefix},
        auth={"methods": ["keys"]},
        limits={"user": {**NO_LIMITS, "requests_per_s": 2}},
    )
    await services.router(config)
    await services.worker(config, "m", cluster="a")
    app = create_app(config, services.nats_url)
    table_auth(app, USERS)
    return await services.gateway(app)


async def test_requests_tokens_and_latencies_move_with_model_and_cluster_labels(gateway):
    before = await scrape(gateway + "/metrics")
    client = sdk(gateway, "alice")
    whole = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4)
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=7, stream=True, stream_options={"include_usage": True}
    )
    usage = [chunk.usage async for chunk in stream if chunk.usage][-1]
    vectors = await sdk(gateway, "carol").embeddings.create(model="m", input=["one two", "three"])
    with pytest.raises(openai.NotFoundError):
        await sdk(gateway, "carol").chat.completions.create(model="no/such", messages=MESSAGES)
    await client.close()
    after = await scrape(gateway + "/metrics")

    ok = {"model": "m", "cluster": "a"}
    assert moved(before, after, "first_gateway_requests_total", **ok, endpoint="chat", status="200") == 2
    assert moved(before, after, "first_gateway_request_duration_seconds_count", **ok, endpoint="chat") == 2
    prompt = whole.usage.prompt_tokens + usage.prompt_tokens + vectors.usage.prompt_tokens
    assert moved(before, after, "first_gateway_tokens_total", **ok, direction="in") == prompt > 0
    assert moved(before, after, "first_gateway_tokens_total", **ok, direction="out") == 4 + 7
    assert moved(before, after, "first_gateway_requests_total", **ok, endpoint="embedding", status="200") == 1
    assert vectors.usage.prompt_tokens > 0
    # Only the stream has a first token and tokens after it to time.
    assert moved(before, after, "first_gateway_time_to_first_token_seconds_count", **ok) == 1
    assert moved(before, after, "first_gateway_inter_token_latency_seconds_count", **ok) == 1
    assert 0 < moved(before, after, "first_gateway_time_to_first_token_seconds_sum", **ok) < 5
    # A model the config does not name is counted under one label; no worker took it.
    unknown = {"model": "other", "cluster": "none", "endpoint": "chat", "status": "404"}
    assert moved(before, after, "first_gateway_requests_total", **unknown) == 1
    assert not any("no/such" in str(labels) for _, labels in after)
    assert value(after, "first_gateway_nats_reconnects_total") == 0


async def test_limit_refusals_are_counted_as_429s_of_their_model(gateway):
    before = await scrape(gateway + "/metrics")
    client = sdk(gateway, "bob")
    answers = await asyncio.gather(
        *(client.completions.create(model="m", prompt="hi", max_tokens=1) for _ in range(5)),
        return_exceptions=True,
    )
    await client.close()
    after = await scrape(gateway + "/metrics")
    refused = sum(isinstance(a, openai.RateLimitError) for a in answers)
    assert refused >= 3 and all(isinstance(a, openai.RateLimitError) or a.choices for a in answers)
    assert moved(before, after, "first_gateway_limit_refusals_total", model="m") == refused
    rejected = {"model": "m", "cluster": "none", "endpoint": "completion", "status": "429"}
    assert moved(before, after, "first_gateway_requests_total", **rejected) == refused


async def test_a_caller_who_leaves_before_the_answer_begins_is_counted_as_499(gateway):
    before = await scrape(gateway + "/metrics")
    body = {"model": "idle", "prompt": "hi"}
    headers = {"Authorization": "Bearer alice"}
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        with pytest.raises(TimeoutError):  # the request waits for a worker; the caller gives up
            await http.post(gateway + "/v1/completions", json=body, headers=headers)
    left = {"model": "idle", "cluster": "none", "endpoint": "completion", "status": "499"}

    async def counted():
        return moved(before, await scrape(gateway + "/metrics"), "first_gateway_requests_total", **left) == 1

    await eventually(counted, what="the abandoned request counted")


async def test_metrics_off_serves_no_metrics_and_still_answers(services, subjects):
    config = make_config([{"id": "m"}], nats={"subject_prefix": subjects.prefix}, metrics={"gateway": False})
    await services.router(config)
    await services.worker(config, "m")
    url = await services.gateway(create_app(config, services.nats_url))
    client = sdk(url, "unused")
    answer = await client.completions.create(model="m", prompt="hi", max_tokens=2)
    await client.close()
    assert answer.usage.completion_tokens == 2
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        assert r.status == 404
