"""Routers killed while they hold requests, alone or beside others, idle or under load."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from shared import errors
from shared.client import new_id
from tests.processes import (
    DISPATCH_TIMEOUT_S,
    MISSED_HEARTBEATS,
    ROUTER_HEARTBEAT_S,
    WORKER_HEARTBEAT_S,
    chat_body,
    sse_events,
)
from tests.support import eventually

pytestmark = pytest.mark.faults

ROUTER_LOST_S = MISSED_HEARTBEATS * ROUTER_HEARTBEAT_S  # silence after which a caller gives a router up
TICK_S = 0.1  # the client's watchdog tick
COLD = {"id": "cold", "capacity": 8, "engine": {"kind": "sim", "ttft_ms": 20, "itl_ms": 5}}


def held_by(fleet, router) -> int:
    beat = fleet.bus.last_router_beat(router.router_id)
    return beat.held if beat is not None else 0


async def test_requests_held_by_a_killed_router_are_answered_once_through_the_other(fleet):
    """Two routers hold requests for a cold model; SIGKILL the one holding more. Its callers submit
    again within three router heartbeat intervals (plus slack) and the other router holds them all;
    once a worker comes, every request is answered exactly once: one whole answer per caller and
    one "ok" run per request id, the moved ones under attempt 1."""
    fleet.configure([COLD])
    routers = await asyncio.gather(fleet.router("router-1"), fleet.router("router-2"))
    client = await fleet.client()
    ids = [new_id() for _ in range(8)]
    body = chat_body("cold", max_tokens=3)
    calls = [asyncio.create_task(client.complete("cold", "chat", body, request_id=rid)) for rid in ids]

    await eventually(
        lambda: sum(held_by(fleet, r) for r in routers) == len(ids), timeout=3, what="both routers' holdings"
    )
    victim, survivor = sorted(routers, key=lambda r: held_by(fleet, r), reverse=True)
    moved = held_by(fleet, victim)
    killed_at = victim.kill()
    await eventually(
        lambda: held_by(fleet, survivor) == len(ids),
        timeout=ROUTER_LOST_S + 3,
        what=f"{survivor.name} to hold every request",
    )
    took = time.monotonic() - killed_at
    bound = ROUTER_LOST_S + TICK_S + ROUTER_HEARTBEAT_S + 1.0  # detection, resubmission, the next beat
    assert took <= bound, f"the requests moved {took:.2f} s after the kill (bound {bound:.2f} s)"
    assert not any(c.done() for c in calls)

    await fleet.worker("w", "cold")
    ready_at = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
    served_after = time.monotonic() - ready_at
    for result in results:
        assert result.worker_id == "w" and result.usage.completion_tokens == 3
        assert len(result.texts[0].split()) == 3, result.texts

    ok = await eventually(
        lambda: (c := fleet.bus.ok_runs(set(ids))) and min(c.values()) >= 1 and c, timeout=2, what="usage"
    )
    assert set(ok.values()) == {1}, ok
    attempts = sorted(r.attempt for r in fleet.bus.records(set(ids)))
    assert attempts == [0] * (len(ids) - moved) + [1] * moved, attempts
    bound = WORKER_HEARTBEAT_S + 1.0  # the router drains its queue on the worker's next heartbeat
    assert served_after <= bound, f"the answers came {served_after:.2f} s after the worker was ready"


async def _post(url: str, body: dict, began: asyncio.Event | None = None) -> dict:
    """One HTTP request; what the caller saw and when it ended."""
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as r:
        out = {"status": r.status, "retry_after": r.headers.get("Retry-After")}
        if body.get("stream"):
            if began is not None:
                began.set()
            out["events"] = [data async for _, data in sse_events(r)]
        else:
            out["body"] = await r.json()
    out["ended"] = time.monotonic()
    return out


async def test_callers_of_the_only_router_get_503_soon_after_it_is_killed(fleet):
    """SIGKILL the only router while it holds requests for a cold model: plain HTTP callers get 503
    with Retry-After, and a stream that had begun (keep-alives) ends with a no_capacity error event
    and [DONE], within three router heartbeat intervals plus a second; a new request then gets 503
    at once."""
    fleet.configure([COLD])
    gateway, router = await asyncio.gather(fleet.gateway(), fleet.router())
    url = gateway.url + "/v1/chat/completions"
    plain = {"model": "cold", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    streaming = asyncio.Event()
    calls = [asyncio.create_task(_post(url, plain)) for _ in range(3)]
    calls.append(asyncio.create_task(_post(url, {**plain, "stream": True}, streaming)))

    await eventually(lambda: held_by(fleet, router) == 4, timeout=3, what="the router to hold 4 requests")
    await asyncio.wait_for(streaming.wait(), timeout=3)  # the stream's headers went out with a keep-alive
    killed_at = router.kill()
    results = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)

    bound = ROUTER_LOST_S + TICK_S + 1.0
    for result in results[:3]:
        assert result["status"] == 503 and int(result["retry_after"]) >= 1, result
        assert result["body"]["error"]["code"] == "no_capacity", result
    stream = results[3]
    assert stream["status"] == 200 and stream["events"][-1] == b"[DONE]", stream
    assert orjson.loads(stream["events"][-2])["error"]["code"] == "no_capacity", stream
    for result in results:
        took = result["ended"] - killed_at
        assert took <= bound, f"a caller waited {took:.2f} s after the kill (bound {bound:.2f} s)"

    began = time.monotonic()
    late = await _post(url, plain)
    assert late["status"] == 503 and late["retry_after"], late
    assert late["ended"] - began < 1.0


async def test_killing_one_of_three_routers_under_load_answers_every_request_once(fleet):
    """200 requests from 20 concurrent callers through three routers and two workers; SIGKILL one
    router halfway. Every request gets exactly one whole answer (the callers' view) and exactly one
    "ok" run (the usage records), and no caller waits longer than the accept timeout plus three
    router heartbeat intervals, a dispatch timeout and slack."""
    fleet.configure([{"id": "m", "capacity": 6, "engine": {"kind": "sim", "ttft_ms": 20, "itl_ms": 5}}])
    started = await asyncio.gather(
        fleet.router("router-1"),
        fleet.router("router-2"),
        fleet.router("router-3"),
        fleet.worker("wa", "m"),
        fleet.worker("wb", "m", cluster="b"),
    )
    victim = started[0]
    await fleet.routed(["wa", "wb"])
    accept_timeout_s = 2.0
    client = await fleet.client(accept_timeout_s=accept_timeout_s)

    total, callers = 200, 20
    ids = [new_id() for _ in range(total)]
    pending = iter(enumerate(ids))
    results: dict[str, tuple] = {}
    halfway = asyncio.Event()
    timings: list[float] = []

    async def caller() -> None:
        for i, rid in pending:
            began = time.monotonic()
            try:
                outcome = await client.complete(
                    "m", "chat", chat_body("m", f"request {i}", max_tokens=5), request_id=rid
                )
            except errors.FirstError as exc:
                outcome = exc
            timings.append(time.monotonic() - began)
            results[rid] = (outcome, began)
            if len(results) >= total // 2:
                halfway.set()

    load = asyncio.gather(*(caller() for _ in range(callers)))
    await asyncio.wait_for(halfway.wait(), timeout=30)
    killed_at = victim.kill()
    await asyncio.wait_for(load, timeout=60)

    failed = {rid: r for rid, (r, _) in results.items() if isinstance(r, Exception)}
    assert not failed, failed
    assert len(results) == total
    for result, _ in results.values():
        assert result.usage.completion_tokens == 5 and len(result.texts[0].split()) == 5, result
    bound = accept_timeout_s + ROUTER_LOST_S + DISPATCH_TIMEOUT_S + 2.0
    assert max(timings) <= bound, f"a caller waited {max(timings):.2f} s (bound {bound:.2f} s)"
    assert any(began <= killed_at for _, began in results.values())

    ok = await eventually(
        lambda: (c := fleet.bus.ok_runs(set(ids))) and min(c.values()) >= 1 and c, timeout=3, what="usage"
    )
    twice = {rid: n for rid, n in ok.items() if n != 1}
    assert not twice, f"requests with more than one ok run: {twice}"
    by_id = {r.request_id: r for r in fleet.bus.records(set(ids)) if r.outcome == "ok"}
    assert all(by_id[rid].worker_id == results[rid][0].worker_id for rid in ids)
    others = [(r.outcome, r.attempt) for r in fleet.bus.records(set(ids)) if r.outcome != "ok"]
    assert all(outcome == "cancelled" for outcome, _ in others), others
