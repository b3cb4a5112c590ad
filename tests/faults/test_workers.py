"""Workers that die, freeze or report garbage, as separate processes; what the caller sees and how soon."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import aiohttp
import orjson
import pytest

from shared.client import new_id
from tests.processes import (
    DISPATCH_TIMEOUT_S,
    MISSED_HEARTBEATS,
    WORKER_HEARTBEAT_S,
    chat_body,
    sse_events,
)
from tests.support import eventually

pytestmark = pytest.mark.faults

WORKER_LOST_S = MISSED_HEARTBEATS * WORKER_HEARTBEAT_S  # silence after which a caller gives a worker up


def text_of(chunks) -> str:
    return "".join(d.text for c in chunks for d in c.deltas)


async def test_worker_killed_before_its_first_token_reruns_elsewhere_unnoticed(fleet):
    """SIGKILL the worker running a request before its first token: the request runs again on the
    other worker and the caller gets one whole, ordinary answer, late by at most three heartbeat
    intervals (plus a tick) and the second run."""
    ttft_s = 3.0
    fleet.configure([{"id": "m", "engine": {"kind": "sim", "ttft_ms": ttft_s * 1000, "itl_ms": 10}}])
    _, wa, wb = await asyncio.gather(fleet.router(), fleet.worker("wa", "m"), fleet.worker("wb", "m"))
    workers = {"wa": wa, "wb": wb}
    await fleet.routed(list(workers))
    client = await fleet.client()

    rid = new_id()
    async with client.open("m", "chat", chat_body("m", max_tokens=5, stream=True), request_id=rid) as answer:
        first = await eventually(lambda: answer.started, timeout=3, what="the request to start on a worker")
        killed_at = workers[first.worker_id].kill()
        chunks = [c async for c in answer if c is not None]
        took = time.monotonic() - killed_at
        second = answer.started

    assert second.worker_id != first.worker_id and second.attempt == 1
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].done and chunks[-1].usage.completion_tokens == 5
    assert len(text_of(chunks).split()) == 5, text_of(chunks)  # one answer, not two spliced together
    bound = WORKER_LOST_S + 0.2 + ttft_s + 1.0  # detection, a client tick and a dispatch; the rerun; slack
    assert took <= bound, f"the answer ended {took:.2f} s after the kill (bound {bound:.2f} s)"

    records = await eventually(lambda: fleet.bus.records({rid}), timeout=2, what="the usage record")
    assert [(r.worker_id, r.attempt, r.outcome) for r in records] == [(second.worker_id, 1, "ok")]


async def test_worker_killed_mid_stream_ends_the_sse_stream_with_an_error_at_once(fleet):
    """SIGKILL the worker after the first token of a stream through the gateway: the SSE stream ends
    with an engine_error event and ``data: [DONE]`` within three heartbeat intervals (plus slack),
    not after the stall timeout (60 s here)."""
    fleet.configure([{"id": "m", "engine": {"kind": "sim", "ttft_ms": 10, "itl_ms": 1000}}])
    gateway, _, worker = await asyncio.gather(fleet.gateway(), fleet.router(), fleet.worker("w", "m"))
    await fleet.routed(["w"])

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 30}
    killed_at = 0.0
    events: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            async with asyncio.timeout(20):
                async for at, data in sse_events(r):
                    events.append((at, data))
                    if not killed_at and data != b"[DONE]" and _content(data):
                        killed_at = worker.kill()
    assert killed_at, f"no token came: {events}"

    after = [(at, data) for at, data in events if at >= killed_at]
    assert [data for _, data in after][-1] == b"[DONE]", after
    error_at, error = after[-2]
    assert orjson.loads(error)["error"]["code"] == "engine_error", error
    assert all(not _content(data) for _, data in after[:-2]), after  # no text after the kill
    took = error_at - killed_at
    bound = WORKER_LOST_S + 0.2 + 1.0
    assert took <= bound, f"the error event came {took:.2f} s after the kill (bound {bound:.2f} s)"


def _content(data: bytes) -> str:
    if data == b"[DONE]":
        return ""
    event = orjson.loads(data)
    return "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices") or [])


async def test_dispatch_answered_late_by_a_frozen_worker_is_answered_once(fleet):
    """SIGSTOP a worker (still subscribed, but mute) while another is ready, send requests: the
    dispatches to the frozen worker time out and run on the other one; after SIGCONT, the frozen
    worker's late runs never reach the callers and are cancelled. Each request gets one answer,
    within the dispatch timeout plus two runs (plus slack), and the books show one "ok" run each."""
    fleet.configure([{"id": "m", "capacity": 4, "engine": {"kind": "sim", "ttft_ms": 300, "itl_ms": 10}}])
    router, wa, _ = await asyncio.gather(fleet.router(), fleet.worker("wa", "m"), fleet.worker("wb", "m"))
    await fleet.routed(["wa", "wb"])
    client = await fleet.client()

    wa.pause()
    ids = [new_id() for _ in range(6)]

    async def call(i: int, rid: str):
        began = time.monotonic()
        result = await client.complete(
            "m", "chat", chat_body("m", f"question {i}", max_tokens=4), request_id=rid
        )
        return result, time.monotonic() - began

    calls = [asyncio.create_task(call(i, rid)) for i, rid in enumerate(ids)]

    def timed_out() -> list[dict]:
        return [e for e in router.events("dispatch_timeout") if e.get("worker_id") == "wa"]

    given_up = await eventually(
        timed_out, timeout=DISPATCH_TIMEOUT_S + 3, what="a dispatch to wa to time out"
    )
    wa.resume()
    results = await asyncio.gather(*calls)

    run_s = 0.3 + 4 * 0.01
    bound = DISPATCH_TIMEOUT_S + 0.2 + 2 * run_s + 1.5
    for result, took in results:
        assert result.usage.completion_tokens == 4 and len(result.texts[0].split()) == 4, result
        assert took <= bound, f"a request took {took:.2f} s (bound {bound:.2f} s)"

    given_up_ids = {e["request_id"] for e in given_up}

    def late_runs_ended():
        late = [r for r in fleet.bus.records(given_up_ids) if r.worker_id == "wa" and r.attempt == 0]
        return late if len(late) >= len(given_up_ids) else None

    late = await eventually(late_runs_ended, timeout=3, what="wa's late runs to end")
    assert {r.outcome for r in late} == {"cancelled"}, late
    ok = await eventually(lambda: fleet.bus.ok_runs(set(ids)), timeout=2)
    assert set(ok.values()) == {1}, ok
    served = {r.request_id: r for r in fleet.bus.records(set(ids)) if r.outcome == "ok"}
    assert all(
        served[rid].worker_id == result.worker_id for rid, (result, _) in zip(ids, results, strict=True)
    )
    assert all(served[rid].attempt >= 1 for rid in given_up_ids)  # they ran again, under a new attempt


async def test_worker_with_garbage_engine_metrics_keeps_heartbeating_and_serving(fleet):
    """A worker whose engine's /metrics answers NaN and junk (openai engine, tests.mock_engine
    --metrics garbage) heartbeats every interval (no gap a router would take for death), reports
    no load figures it could not read, serves requests, and logs no traceback."""
    engine = await fleet.mock_engine("engine", "--metrics", "garbage")
    openai = {"kind": "openai", "url": engine.url, "served_model": "mock", "metrics_path": "/metrics"}
    fleet.configure([{"id": "m", "engine": openai}])
    _, worker = await asyncio.gather(fleet.router(), fleet.worker("w", "m"))
    await fleet.routed(["w"])

    since = time.monotonic()
    wanted = 10
    beats = await eventually(
        lambda: (b := fleet.bus.beats_of("w", since)) and len(b) >= wanted and b,
        timeout=wanted * WORKER_HEARTBEAT_S + 2,
        what=f"{wanted} heartbeats",
    )
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(beats)]
    assert max(gaps) < WORKER_LOST_S, f"heartbeat gaps {gaps}"
    for _, beat in beats:
        assert beat.state == "ready"
        load = beat.engine
        assert load.running is None and load.waiting is None and load.kv_cache_usage is None, load

    client = await fleet.client()
    for stream in (False, True, False, True):
        result = await asyncio.wait_for(
            client.complete("m", "chat", chat_body("m", max_tokens=3, stream=stream)), timeout=5
        )
        assert result.texts == {0: " tok tok tok"} and result.usage.completion_tokens == 3
    assert not worker.tracebacks(), worker.tracebacks()


async def test_worker_killed_after_taking_a_held_request_before_its_answer_began_is_not_waited_for(fleet):
    """A request waits at the router (no worker yet); a worker comes, takes it, and is SIGKILLed
    before it could send Started. The caller knows only the router, which is alive: the router,
    seeing the worker's heartbeats stop, tells the caller to submit again, and another worker
    answers, within the worker-loss detection plus a start, not after the request timeout."""
    from shared import schema

    ttft_s = 1.0
    fleet.configure(
        [{"id": "m", "capacity": 1, "engine": {"kind": "sim", "ttft_ms": ttft_s * 1000, "itl_ms": 10}}]
    )
    router = await fleet.router()
    client = await fleet.client(request_timeout_s=30)
    killed: list[float] = []

    async def on_ack(msg) -> None:  # the worker's acceptance, on its way to the router
        reply = schema.dispatch_reply_decoder.decode(msg.data)
        wa = next((p for p in fleet.procs if p.name == "wa"), None)
        if reply.accepted and not killed and wa is not None:
            killed.append(wa.kill())  # within the 0.05 s before its Started goes out

    queued: list[int] = []

    async def on_demand(msg) -> None:
        queued.extend(d.queued for d in [schema.demand_decoder.decode(msg.data)] if d.queued)

    await fleet.nc.subscribe(fleet.subjects.router_ack_all(router.router_id), cb=on_ack)
    await fleet.nc.subscribe(fleet.subjects.demand, cb=on_demand)
    rid = new_id()
    call = asyncio.create_task(client.complete("m", "chat", chat_body("m", max_tokens=3), request_id=rid))
    await eventually(lambda: queued, what="the router to hold the request")
    with contextlib.suppress(AssertionError):  # it may be dead before it is seen ready
        await fleet.worker("wa", "m")
    await eventually(lambda: killed, what="wa to take the held request")
    await fleet.worker("wb", "m")
    result = await asyncio.wait_for(call, 30)
    took = time.monotonic() - killed[0]
    assert (result.worker_id, result.usage.completion_tokens) == ("wb", 3)
    bound = (
        WORKER_LOST_S + 1.0 + 0.2 + ttft_s + 3.0
    )  # detection, a housekeeping round, a tick; the run; wb's start
    assert took <= bound, f"answered {took:.2f} s after the kill (bound {bound:.2f} s)"
