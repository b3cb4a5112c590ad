"""The mock engine through real HTTP: it answers like vLLM, its faults are the ones asked for, and
bad input never takes it down. The load generator is checked against it too."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import orjson
import pytest

from bench.loadgen import Load, run
from tests import mock_engine
from tests.support import ROOT

CHAT = [{"role": "user", "content": "Say hello to the test"}]


@pytest.fixture
async def engine():
    engine = await mock_engine.start(models=("mock", "other"))
    yield engine
    await engine.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def sse(resp: aiohttp.ClientResponse) -> list[dict | str]:
    """The stream's events, decoded; ``[DONE]`` stays a string."""
    events = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            data = line[6:].strip()
            events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return events


async def test_a_whole_chat_answer_has_max_tokens_words_usage_and_finish_reason_length(engine, http):
    body = {"model": "mock", "messages": CHAT, "max_tokens": 5}
    async with http.post(engine.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["object"] == "chat.completion"
    assert answer["id"].startswith("chatcmpl-")
    (choice,) = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": mock_engine.TOKEN * 5}
    assert choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


async def test_a_streamed_chat_sends_the_role_then_one_event_per_token_then_usage_and_done(engine, http):
    body = {"model": "other", "messages": CHAT, "max_completion_tokens": 3, "max_tokens": 9, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    async with http.post(engine.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        assert r.headers["Transfer-Encoding"] == "chunked"
        events = await sse(r)
    assert events[-1] == "[DONE]"
    first, *tokens, usage, _ = events
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"]["content"] for e in tokens] == [mock_engine.TOKEN] * 3
    assert [e["choices"][0]["finish_reason"] for e in tokens] == [None, None, "length"]
    assert {e["object"] for e in events[:-1]} == {"chat.completion.chunk"}
    assert {e["model"] for e in events[:-1]} == {"other"}
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 3  # max_completion_tokens wins over max_tokens


async def test_a_streamed_completion_without_max_tokens_has_16_tokens_and_no_usage_chunk(engine, http):
    body = {"model": "mock", "prompt": "once upon", "stream": True}
    async with http.post(engine.url + "/v1/completions", json=body) as r:
        events = await sse(r)
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert texts == [mock_engine.TOKEN] * mock_engine.DEFAULT_TOKENS
    assert all(e["object"] == "text_completion" and "usage" not in e for e in events[:-1])


async def test_an_unknown_model_gets_vllms_404_body(engine, http):
    body = {"model": "nope", "prompt": "x"}
    async with http.post(engine.url + "/v1/completions", json=body) as r:
        assert r.status == 404
        assert await r.json() == {"object": "error", "message": "The model `nope` does not exist.",
                                  "type": "NotFoundError", "param": None, "code": 404}  # fmt: skip


async def test_mock_status_429_answers_with_retry_after(engine, http):
    body = {"model": "mock", "messages": CHAT, "stream": True, "mock_status": 429}
    async with http.post(engine.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "3"
        error = await r.json()
    assert error["code"] == 429 and error["type"] == "RateLimitError"


async def test_mock_delays_hold_the_first_token_and_space_the_rest(engine, http):
    body = {"model": "mock", "prompt": "x", "max_tokens": 3, "stream": True, "mock_ttft_ms": 100,
            "mock_itl_ms": 50}  # fmt: skip
    started = time.perf_counter()
    arrivals = []
    async with http.post(engine.url + "/v1/completions", json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                arrivals.append(time.perf_counter() - started)
    assert arrivals[0] >= 0.095
    assert arrivals[2] - arrivals[0] >= 0.095  # two gaps of 50 ms
    assert engine.running == 0


async def test_a_hanging_request_never_answers_and_does_not_block_others(engine, http):
    body = {"model": "mock", "prompt": "x", "mock_hang": True}
    hung = asyncio.create_task(http.post(engine.url + "/v1/completions", json=body))
    async with http.get(engine.url + "/health") as r:
        assert r.status == 200
    await asyncio.sleep(0.1)
    assert not hung.done() and engine.running == 1
    async with http.get(engine.url + "/metrics") as r:
        assert 'vllm:num_requests_running{model_name="mock"} 1.0' in await r.text()
    await engine.stop()  # closes the hanging connection
    with pytest.raises(aiohttp.ClientError):
        await hung


async def test_models_health_metrics_and_routing_errors(engine, http):
    async with http.get(engine.url + "/v1/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["mock", "other"]
    async with http.get(engine.url + "/metrics") as r:
        text = await r.text()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name in text
    async with http.get(engine.url + "/v1/nothing") as r:
        assert r.status == 404
    async with http.get(engine.url + "/v1/completions") as r:
        assert r.status == 405 and r.headers["Allow"] == "POST"
    for data in (b"{not json", b"[1, 2]", b'{"model": "mock"}', b'{"prompt": "x", "max_tokens": 0}'):
        async with http.post(engine.url + "/v1/completions", data=data) as r:
            assert r.status == 400, data


async def test_garbage_metrics_are_nan_and_junk():
    async with mock_engine.MockEngine(metrics="garbage") as engine, aiohttp.ClientSession() as http:
        async with http.get(engine.url + "/metrics") as r:
            text = await r.text(errors="replace")
    assert "vllm:num_requests_running" in text and "NaN" in text


async def test_malformed_http_gets_400_and_the_server_keeps_serving(engine, http):
    for junk in (b"GARBAGE\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n"):
        reader, writer = await asyncio.open_connection(engine.host, engine.port)
        writer.write(junk)
        status_line = await reader.readline()
        assert status_line.startswith(b"HTTP/1.1 400"), status_line
        writer.close()
    async with http.get(engine.url + "/health") as r:
        assert r.status == 200


async def test_keep_alive_serves_many_requests_on_one_connection(engine):
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(5):
            async with http.post(engine.url + "/v1/completions", json={"prompt": "x"}) as r:
                assert r.status == 200
    assert engine.connections == 1


async def test_the_command_prints_its_url_and_stops_on_sigterm():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.mock_engine", "--port", "0", "--model", "a", "--model", "b",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
    assert line.startswith("listening on http://127.0.0.1:")
    async with aiohttp.ClientSession() as http, http.get(line.split()[-1] + "/v1/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["a", "b"]
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_the_load_generator_checks_and_counts_every_answer(engine, stream):
    load = Load(engine.url + "/v1/completions", "mock", clients=3, requests=30, stream=stream, tokens=7)
    result = await run(load)
    assert result["requests"] == 30 and result["errors"] == 0
    assert result["latency_ms"]["p50"] > 0
    assert (result["ttfe_ms"]["p50"] is not None) == stream
    assert result["tokens_per_s"] * result["seconds"] == pytest.approx(30 * 7)
    if stream:
        assert result["text_events_per_s"] * result["seconds"] == pytest.approx(30 * 7)


async def test_the_load_generator_counts_errors_by_status(engine):
    load = Load(engine.url + "/v1/completions", "mock", clients=2, requests=6, extra={"mock_status": 503})
    result = await run(load)
    assert result["requests"] == 0 and result["errors_by_status"] == {"503": 6}
    hang = Load(engine.url + "/v1/completions", "mock", requests=1, timeout=0.2, extra={"mock_hang": True})
    assert (await run(hang))["errors_by_status"] == {"timeout": 1}
