"""The HTTP API through the official openai SDK and raw HTTP, against ``first up`` with simulated engines."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import nats
import openai
import orjson
import pytest

from shared import errors
from shared.client import FirstClient

MESSAGES = [{"role": "user", "content": "tell me about the cluster"}]
JSON = {"Content-Type": "application/json"}  # the gateway takes no other body (415)


async def test_streamed_chat_matches_the_whole_answer(oai):
    whole = await oai.chat.completions.create(model="sim/hot", messages=MESSAGES, seed=7)
    stream = await oai.chat.completions.create(
        model="sim/hot", messages=MESSAGES, seed=7, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == whole.choices[0].message.content and content
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert whole.usage.prompt_tokens == 5  # the simulator counts words
    assert whole.usage.completion_tokens == len(content.split())
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


async def test_completions_streamed_and_not(oai):
    whole = await oai.completions.create(model="sim/hot", prompt="once upon a time", max_tokens=6, seed=2)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 6 and len(whole.choices[0].text.split()) == 6
    stream = await oai.completions.create(
        model="sim/hot", prompt="once upon a time", max_tokens=6, seed=2, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


async def test_models_list_their_live_status_and_clusters(oai):
    models = {m.id: m.model_extra for m in (await oai.models.list()).data}
    assert models["sim/hot"]["status"] == "live"
    assert models["sim/hot"]["clusters"] == ["polaris", "sophia"]
    assert models["sim/cold"]["clusters"] == ["sophia"]
    assert models["sim/never"]["status"] in ("offline", "starting", "queued")


async def test_unknown_model_is_404_in_openai_shape(oai):
    with pytest.raises(openai.NotFoundError) as info:
        await oai.chat.completions.create(model="no/such-model", messages=MESSAGES)
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "no/such-model" in error["message"]


async def test_ill_typed_field_is_400_naming_it(oai):
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(model="sim/hot", messages=MESSAGES, temperature="hot")
    assert info.value.body["param"] == "temperature"
    assert info.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/chat/completions", b'{"model": "sim/hot", "messages": [', 400, "invalid_request"),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "invalid_request"),
        ("POST", "/v1/embeddings/nothing", b"{}", 404, "not_found"),
        ("GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
        ("POST", "/v1/chat/completions", b"x" * 3_000_000, 413, "payload_too_large"),
    ],
)
async def test_bad_requests_get_openai_errors(sim_stack, method, path, body, status, code):
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, sim_stack.base_url + path, data=body, headers=JSON) as r,
    ):
        payload = await r.json()
    assert r.status == status
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["code"] == code


async def test_body_over_the_nats_payload_limit_is_413_not_a_timeout(oai):
    big = "word " * 300_000  # 1.5 MB: under the HTTP limit, over nats-server's 1 MiB max_payload
    with pytest.raises(openai.APIStatusError) as info:
        await oai.chat.completions.create(model="sim/hot", messages=[{"role": "user", "content": big}])
    assert info.value.status_code == 413
    assert "NATS" in info.value.body["message"]


async def test_no_capacity_in_time_is_503_with_retry_after(sim_stack):
    body = {"model": "sim/never", "messages": MESSAGES}
    async with aiohttp.ClientSession() as http:
        async with http.post(sim_stack.base_url + "/v1/chat/completions", json=body) as r:
            payload = await r.json()
    assert r.status == 503
    assert r.headers["Retry-After"] == "3"
    assert payload["error"]["code"] == "no_capacity"


async def test_an_answer_that_stops_mid_stream_ends_with_a_timeout_event(oai):
    """The stall timer is for streams that go silent after text began (here: after one token)."""
    stream = await oai.chat.completions.create(model="sim/stuck", messages=MESSAGES, stream=True)
    text = []
    with pytest.raises(openai.APIError, match="sent nothing for 2 s"):
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
    assert len(text) == 1


async def test_a_request_waiting_in_the_engine_is_kept_alive_not_cut(sim_stack):
    """sim/stall holds every request in its engine (a long prefill, vLLM's own queue): the stream
    stays open past the stall timeout (2 s), with SSE comments every 0.5 s for proxies."""
    body = {"model": "sim/stall", "messages": MESSAGES, "stream": True}
    started = time.monotonic()
    comments = 0
    async with (
        aiohttp.ClientSession() as http,
        http.post(sim_stack.base_url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        while time.monotonic() - started < 3.5:
            line = await asyncio.wait_for(r.content.readline(), 2)
            assert not line.startswith(b"data:"), line
            comments += line == b": keep-alive\n"
    assert comments >= 5


async def test_no_answer_within_the_request_timeout_is_an_engine_timeout(sim_stack, nats_url):
    nc = await nats.connect(nats_url)
    async with FirstClient(nc, sim_stack.subjects, request_timeout_s=1) as client:
        started = time.monotonic()
        with pytest.raises(errors.EngineTimeout, match="did not begin within 1 s"):
            await client.complete(
                "sim/stall", "chat", orjson.dumps({"model": "sim/stall", "messages": MESSAGES})
            )
        assert time.monotonic() - started < 2
    await nc.close()


async def test_health(sim_stack):
    async with aiohttp.ClientSession() as http, http.get(sim_stack.base_url + "/health") as r:
        assert r.status == 200 and (await r.json())["nats"] is True


async def test_clients_sending_the_same_request_id_do_not_collide(sim_stack):
    body = {"model": "sim/hot", "messages": MESSAGES, "max_tokens": 3}
    headers = {"X-Request-Id": "same-id"}
    async with aiohttp.ClientSession() as http:

        async def call():
            async with http.post(
                sim_stack.base_url + "/v1/chat/completions", json=body, headers=headers
            ) as r:
                return r.status, r.headers["X-Request-Id"], await r.json()

        results = await asyncio.gather(*(call() for _ in range(4)))
    assert [status for status, _, _ in results] == [200] * 4
    assert len({rid for _, rid, _ in results}) == 4
    assert all(payload["usage"]["completion_tokens"] == 3 for _, _, payload in results)


@pytest.mark.parametrize(
    ("body", "headers", "status", "param"),
    [
        (b'{"model": "sim/hot", "messages": [{"role": "user", "content": "\xff\xfe"}]}', JSON, 400, None),
        (
            b'{"model": "sim/hot", "messages": [{"role": "user"}], "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",
            JSON,
            400,
            None,
        ),
        (
            b'{"model": "sim/hot", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
            JSON,
            400,
            "messages[0].content[0].text",
        ),
        (
            b'{"model": "sim/hot", "messages": [{"role": "user"}], "max_tokens": ' + b"1" * 31 + b"}",
            JSON,
            400,
            "max_tokens",
        ),
        (b'{"model": "sim/hot", "messages": [{"role": "user", "content": "hi"}]}', {}, 415, None),
        (
            b'{"model": "sim/hot", "messages": [{"role": "user", "content": "hi"}]}',
            {"Content-Type": "text/plain"},
            415,
            None,
        ),
    ],
    ids=[
        "invalid-utf8",
        "deep-nesting",
        "numeric-text-part",
        "huge-max-tokens",
        "no-content-type",
        "text-plain",
    ],
)
async def test_hostile_bodies_get_4xx_not_5xx(sim_stack, body, headers, status, param):
    """Each of these once answered 500 or 502, or went through to the engine."""
    async with (
        aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as http,
        http.post(sim_stack.base_url + "/v1/chat/completions", data=body, headers=headers) as r,
    ):
        payload = await r.json()
    assert r.status == status
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["param"] == param
