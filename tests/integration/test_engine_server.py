"""The engine-server path that vLLM takes, against a thin stand-in for vLLM.

vLLM needs a GPU, which test machines lack. The stand-in below speaks only the part of vLLM's HTTP
API that the worker uses: /health, Prometheus /metrics, and streamed /v1/chat/completions ending
with a usage chunk. Everything else (worker, router, client, NATS) is real.
"""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web

from shared import errors, schema
from tests.integration.conftest import make_config
from tests.support import eventually, free_port

METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="served-name"} 2.0
vllm:num_requests_waiting{model_name="served-name"} 1.0
vllm:kv_cache_usage_perc{model_name="served-name"} 0.25
"""


@pytest.fixture
async def fake_vllm():
    received: list[dict] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        received.append(body)
        if body.get("max_tokens") == 0:
            error = {"object": "error", "message": "max_tokens must be at least 1", "type": "BadRequestError"}
            return web.json_response(error, status=400)
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        if not body.get("stream"):
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": "a b c"},
                "finish_reason": "stop",
            }
            return web.json_response({"object": "chat.completion", "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for text, finish in (("a", None), (" b", None), (" c", "stop")):
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            await resp.write(b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n")
        await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(text=METRICS)

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", received
    await runner.cleanup()


async def test_worker_streams_from_an_engine_server_and_reports_its_load(services, fake_vllm, nc, subjects):
    url, received = fake_vllm
    engine = {"kind": "openai", "url": url, "served_model": "served-name", "health_path": "/health"}
    engine["metrics_path"] = "/metrics"
    config = make_config([{"id": "org/model", "engine": engine}])
    await services.router(config)
    beats: list[schema.Heartbeat] = []

    async def on_beat(msg):
        beats.append(schema.heartbeat_decoder.decode(msg.data))

    await nc.subscribe(subjects.heartbeat_all, cb=on_beat)
    await services.worker(config, "org/model")
    client = await services.client()

    body = {"model": "org/model", "messages": [{"role": "user", "content": "hi"}], "top_k": 5}
    result = await client.complete("org/model", "chat", orjson.dumps(body))
    assert result.texts[0] == "a b c" and result.finish_reasons[0] == "stop"
    assert result.usage == schema.Usage(prompt_tokens=7, completion_tokens=3)
    sent = received[-1]
    assert sent["model"] == "served-name"
    assert sent["stream"] is False, "a caller that did not ask to stream gets one answer from the engine"
    assert sent["top_k"] == 5, "fields the gateway does not know reach the engine"

    async with client.open("org/model", "chat", orjson.dumps(dict(body, stream=True))) as answer:
        chunks = [c async for c in answer]
    assert "".join(d.text for c in chunks for d in c.deltas) == "a b c"
    assert chunks[-1].usage == schema.Usage(prompt_tokens=7, completion_tokens=3)
    assert received[-1]["stream"] is True and received[-1]["stream_options"] == {"include_usage": True}

    loaded = schema.EngineLoad(running=2, waiting=1, kv_cache_usage=0.25)
    await eventually(lambda: any(b.engine == loaded for b in beats), what="engine load in a heartbeat")

    refused = dict(body, max_tokens=0)
    with pytest.raises(errors.BadRequest, match="max_tokens must be at least 1"):
        await client.complete("org/model", "chat", orjson.dumps(refused))
