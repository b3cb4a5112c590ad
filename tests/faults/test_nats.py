"""NATS itself misbehaving: the server restarts under load, and hostile messages arrive on our subjects."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import aiohttp
import msgspec
import nats
import pytest

from shared import errors
from shared.client import FirstClient, new_id
from tests.processes import MISSED_HEARTBEATS, WORKER_HEARTBEAT_S, chat_body
from tests.support import eventually

pytestmark = pytest.mark.faults

FAST = {"id": "m", "capacity": 4, "engine": {"kind": "sim", "ttft_ms": 20, "itl_ms": 5}}


async def _health(url: str) -> int | None:
    try:
        async with aiohttp.ClientSession() as http, http.get(url + "/health") as r:
            return r.status
    except aiohttp.ClientError:
        return None


async def test_nats_restart_under_light_load_gives_200_or_503_and_recovers(own_fleet, restartable_nats):
    """Four HTTP callers send requests through the gateway before, during and after a nats-server
    restart (same port and store). Every answer is 200, or 503 with Retry-After (never another
    status), no request waits longer than the outage plus 10 s, and every caller is served again
    within 10 s of the server's return."""
    fleet = own_fleet
    fleet.configure([FAST])
    gateway, _, _ = await asyncio.gather(fleet.gateway(), fleet.router(), fleet.worker("w", "m"))
    await fleet.routed(["w"])
    url = gateway.url + "/v1/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    seen: list[dict] = []
    stop = asyncio.Event()

    async def caller(n: int) -> None:
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                entry = {"caller": n, "began": time.monotonic()}
                seen.append(entry)
                try:
                    async with http.post(url, json=body) as r:
                        entry.update(status=r.status, retry_after=r.headers.get("Retry-After"))
                        entry["body"] = await r.read()
                except aiohttp.ClientError as exc:
                    entry.update(status=None, error=repr(exc))
                entry["ended"] = time.monotonic()

    def served(n: int, after: float) -> bool:
        return any(e["caller"] == n and e.get("status") == 200 and e["began"] >= after for e in seen)

    callers = [asyncio.create_task(caller(n)) for n in range(4)]
    try:
        await eventually(lambda: all(served(n, 0) for n in range(4)), timeout=10, what="answers before")
        down_at = time.monotonic()
        await restartable_nats.stop()
        await eventually(lambda: _health_is(gateway.url, 503), timeout=5, what="the gateway to lose NATS")
        await restartable_nats.start()
        up_at = time.monotonic()
        with contextlib.suppress(AssertionError):  # judged below, with what each caller saw
            await eventually(lambda: all(served(n, up_at) for n in range(4)), timeout=10)
        ended_at = time.monotonic()
    finally:
        stop.set()
        _, hung = await asyncio.wait(callers, timeout=3)
        for task in hung:  # still waiting for an answer: judged below as unfinished
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)

    outage = up_at - down_at
    bound = outage + 10
    for n in range(4):
        late = [e for e in seen if e["caller"] == n and e["began"] >= up_at and e.get("status") == 200]
        first = min((e["ended"] - up_at for e in late), default=None)
        assert first is not None and first <= 10, (
            f"caller {n} was not served within 10 s of NATS's return (first answer after {first} s); "
            f"its requests since the outage began (start, status, seconds): {_shown(seen, n, down_at, ended_at)}"
        )
    for e in seen:
        took = e.get("ended", ended_at) - e["began"]
        assert took <= bound, f"a request waited {took:.1f} s (outage {outage:.1f} s): {e}"
        if "ended" not in e:
            continue
        assert e["status"] in (200, 503), e
        if e["status"] == 503:
            assert e["retry_after"] and int(e["retry_after"]) >= 1, e
            assert msgspec.json.decode(e["body"])["error"]["code"] == "no_capacity", e
    for proc in fleet.procs:
        assert not proc.tracebacks(), (proc.name, proc.tracebacks())


def _shown(seen: list[dict], n: int, since: float, now: float) -> list[tuple]:
    """Caller ``n``'s requests that were open at ``since`` or later: (start, status, seconds), times
    relative to ``since``."""
    return [
        (
            round(e["began"] - since, 2),
            e.get("status", "unfinished"),
            round(e.get("ended", now) - e["began"], 2),
        )
        for e in seen
        if e["caller"] == n and e.get("ended", now) >= since
    ]


async def test_answer_finished_during_a_nats_outage_does_not_leave_its_caller_waiting(
    own_fleet, restartable_nats
):
    """A worker finishes a (non-streamed) run while NATS is down, and reconnects before its caller
    does (the caller's client retries every 3 s, the worker's every 2 s), so the answer is lost.
    The caller must not wait out request_timeout_s (30 s here, 600 s by default) while the worker's
    heartbeats reassure it: within the outage plus 10 s it gets the answer (run again) or a 503."""
    fleet = own_fleet
    fleet.configure([{**FAST, "engine": {"kind": "sim", "ttft_ms": 600, "itl_ms": 5}}])
    _, worker = await asyncio.gather(fleet.router(), fleet.worker("w", "m"))
    await fleet.routed(["w"])
    nc = await nats.connect(restartable_nats.url, reconnect_time_wait=3.0, max_reconnect_attempts=-1)
    client = FirstClient(nc, fleet.subjects, request_timeout_s=30, missed_heartbeats=MISSED_HEARTBEATS)
    await client.start()
    rid = new_id()
    try:
        async with client.open("m", "chat", chat_body("m", max_tokens=4), request_id=rid) as answer:
            await eventually(lambda: answer.started, timeout=3, what="the run to start")
            down_at = time.monotonic()
            await restartable_nats.stop()

            def run_ended() -> bool:
                return any(e.get("request_id") == rid for e in worker.events("request_served"))

            await eventually(run_ended, timeout=5, what="the worker to finish the run during the outage")
            await restartable_nats.start()
            up_at = time.monotonic()
            outage = up_at - down_at
            try:
                async with asyncio.timeout(outage + 10):
                    chunks = [c async for c in answer if c is not None]
            except errors.NoCapacity as exc:
                assert exc.retry_after_s, exc
            except TimeoutError:
                raise AssertionError(
                    f"no answer and no error {time.monotonic() - up_at:.1f} s after NATS came back, although "
                    "the worker finished the run during the outage: its answer was lost, and the caller "
                    "would wait for request_timeout_s"
                ) from None
            else:
                assert chunks[-1].done and chunks[-1].usage.completion_tokens == 4, chunks
    finally:
        await client.stop()
        await nc.close()


async def _health_is(url: str, status: int) -> bool:
    return await _health(url) == status


# --- hostile messages ----------------------------------------------------------------------------


def _raw(**fields) -> bytes:
    return msgspec.msgpack.encode(fields)


def _infer(s, **fields) -> bytes:
    base = dict(kind="infer", request_id=new_id(), model="m", endpoint="chat", body=chat_body("m"),
                reply_to=s.reply_stream("hostile", "x"), created=time.time())  # fmt: skip
    return _raw(**{**base, **fields})


def _beat(**fields) -> bytes:
    base = dict(kind="heartbeat", worker_id="ghost", cluster="a", model="m", state="ready",
                capacity=4, in_flight=0, interval_s=WORKER_HEARTBEAT_S)  # fmt: skip
    return _raw(**{**base, **fields})


def hostile_messages(s, router_ids: list[str], worker_id: str) -> list[tuple[str, bytes]]:
    """Garbage and malformed, oversized or lying msgpack for every subject services listen on."""
    junk = [b"", b"\x00" * 16, b"\xc1", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", os.urandom(300),
            b"\x91" * 5000, _raw(kind="zzz"), msgspec.msgpack.encode([1, 2, 3]), b"{}"]  # fmt: skip
    nan = float("nan")
    infer = [
        _raw(kind="infer"),
        _infer(s, request_id="a.b"),
        _infer(s, request_id="x" * 5000),
        _infer(s, model="m" * 10_000),
        _infer(s, endpoint="embeddings"),
        _infer(s, reply_to=">"),
        _infer(s, reply_to="a.*.b"),
        _infer(s, created=nan),
        _infer(s, queue_timeout_s=nan),
        _infer(s, queue_timeout_s=-1.0),
        _infer(s, attempt=10**6),
        _infer(s, attempt=-1),
        _infer(s, body="not bytes"),
        _infer(s, body=b"not json"),
        _infer(s, body=b"[1, 2]"),
        _infer(s, body=b'{"messages": "x", "max_tokens": -5}'),
        _infer(s, body=os.urandom(900_000)),  # oversized, under max_payload: goes as far as the engine
        _infer(s, model="nope"),
        _infer(s, reply_to=s.infer),  # answers to the routers' own subject
        _infer(s, reply_to=s.worker_infer(worker_id)),  # answers to the worker's dispatch subject
    ]
    beats = [
        _beat(capacity=0),
        _beat(worker_id="a.b"),
        _beat(worker_id="*"),
        _beat(interval_s=nan),
        _beat(interval_s=float("inf")),
        _beat(interval_s=0.0),
        _beat(in_flight=-1),
        _beat(state="bogus"),
        _beat(model="m" * 10_000),
        _beat(engine={"running": nan, "kv_cache_usage": 7.0}),
        _beat(capacity=10**12),
        _beat(sent=nan, idle_s=nan),
        _beat(interval_s=3600.0),  # well-formed: a worker that is not there, remembered for hours
        _beat(worker_id=worker_id, state="stopped"),  # a lie about the real worker
    ]
    cancels = [
        _raw(kind="cancel"),
        _raw(kind="cancel", request_id="a.b"),
        _raw(kind="cancel", request_id=new_id(), reason="r" * 10_000),
        _raw(kind="cancel", request_id=new_id(), attempt=-3),
        _raw(kind="cancel", request_id=new_id()),
    ]
    demands = [
        _raw(kind="demand"),
        _raw(kind="demand", router_id="a.b", model="m", queued=1),
        _raw(kind="demand", router_id="router-ghost", model="m", queued=-5),
        _raw(kind="demand", router_id="router-ghost", model="m", queued=1, interval_s=nan),
        _raw(kind="demand", router_id="router-ghost", model="m" * 10_000, queued=1),
    ]
    acks = [_raw(kind="dispatch_reply", accepted="yes"), _raw(kind="dispatch_reply", in_flight=-1)]
    out: list[tuple[str, bytes]] = []
    for payload in junk + infer:
        out.append((s.infer, payload))
    for payload in junk + beats:
        out.append((s.heartbeat("x", "y"), payload))
    for payload in junk + cancels:
        out += [(s.cancel, payload), (s.worker_cancel(worker_id), payload)]
    for payload in junk + demands:
        out.append((s.demand, payload))
    for payload in junk:
        out += [
            (s.worker_infer(worker_id), payload),
            (s.status, payload),
            (s.event("node", "running", "scaler"), payload),
        ]
    for router_id in router_ids:
        for payload in junk + acks:
            out += [(s.router_ack_all(router_id).replace("*", "999999"), payload)]
            out += [(s.router_ack_all(router_id).replace("*", "not-a-number"), payload)]
    return out


async def test_hostile_messages_on_every_subject_do_not_stop_serving(fleet):
    """Garbage bytes and malformed, oversized or hostile msgpack on the infer, heartbeat, cancel,
    demand, status, node-event, dispatch and ack subjects, five rounds of them while requests run:
    routers and worker stay up, requests before, during and after succeed, and no service logs a
    traceback or a line per hostile message."""
    fleet.configure([FAST])
    routers = await asyncio.gather(fleet.router("router-1"), fleet.router("router-2"))
    worker = await fleet.worker("w", "m")
    await fleet.routed(["w"])
    client = await fleet.client()
    body = chat_body("m", max_tokens=4)

    async def serve(n: int) -> None:
        for _ in range(n):
            result = await asyncio.wait_for(client.complete("m", "chat", body), timeout=5)
            assert result.usage.completion_tokens == 4 and result.worker_id == "w"

    await serve(3)
    lines_before = {p.name: len(p.lines()) for p in fleet.procs}
    messages = hostile_messages(fleet.subjects, [r.router_id for r in routers], "w")
    rounds = 5

    async def flood() -> None:
        for _ in range(rounds):
            for subject, payload in messages:
                await fleet.nc.publish(subject, payload, reply=fleet.subjects.reply_stream("hostile", "y"))
            await fleet.nc.flush()

    await asyncio.gather(flood(), serve(10))
    await serve(5)

    sent = rounds * len(messages)
    for proc in [*routers, worker]:
        proc.check_alive()
        assert not proc.tracebacks(), (proc.name, proc.tracebacks()[:3])
        new = proc.lines()[lines_before[proc.name] :]
        loud = [e for e in new if e.get("level") in ("warning", "error", "critical")]
        assert len(loud) < sent / 20, (proc.name, len(loud), sent, _events(loud))


async def test_replies_on_a_routers_ack_subject_that_match_no_dispatch_are_not_logged_one_by_one(fleet):
    """A flood of messages on a router's ack subject that match no dispatch it sent (garbage, or a
    number it never used) costs the router one log line now and then, not one per message."""
    fleet.configure([FAST])
    router = await fleet.router()
    subject = fleet.subjects.router_ack(router.router_id, 999_999)
    flood = 200
    for i in range(flood):
        await fleet.nc.publish(subject, os.urandom(i % 50))
    await fleet.nc.flush()
    after = time.time()
    await eventually(
        lambda: beat_since(fleet, router, after), timeout=3, what="a router beat after the flood"
    )
    lines = [e for e in router.lines() if e.get("event") != "router_started"]
    assert len(lines) <= 5, (len(lines), _events(lines))


def beat_since(fleet, router, after: float) -> bool:
    """The router beat after ``after`` (wall clock): it has read what was sent to it before."""
    return any(b.router_id == router.router_id and b.sent > after for _, b in fleet.bus.router_beats)


async def test_garbage_on_the_ack_subject_of_a_pending_dispatch_does_not_fail_the_request(fleet):
    """Garbage arrives on a router's ack subject while its dispatch to a (frozen) worker is pending;
    then the worker runs the request. The caller gets its answer: the router must not hand the
    same attempt to a worker twice and then fail the running request with 409 duplicate_request."""
    dispatch_timeout_s = (
        3.0  # so the dispatch is still pending when the garbage comes, even on a slow machine
    )
    fleet.configure(
        [{**FAST, "engine": {"kind": "sim", "ttft_ms": 200, "itl_ms": 5}}],
        router={"dispatch_timeout_s": dispatch_timeout_s},
    )
    router, worker = await asyncio.gather(fleet.router(), fleet.worker("w", "m"))
    await fleet.routed(["w"])
    client = await fleet.client()
    worker.pause()
    call = asyncio.create_task(client.complete("m", "chat", chat_body("m", max_tokens=4)))
    beat = fleet.bus.last_router_beat
    await eventually(lambda: (b := beat(router.router_id)) and b.held == 1, timeout=3, what="a dispatch")
    for n in range(50):  # the router numbers its dispatches from 0
        await fleet.nc.publish(fleet.subjects.router_ack(router.router_id, n), b"\xc1garbage")
    await fleet.nc.flush()
    worker.resume()
    try:
        result = await asyncio.wait_for(call, timeout=dispatch_timeout_s + 5)
    except errors.FirstError as exc:
        raise AssertionError(f"the caller got {exc.status} {exc.code}: {exc.message}") from None
    assert result.usage.completion_tokens == 4 and result.worker_id == "w"


async def test_a_forged_demand_message_does_not_close_admission(fleet):
    """One well-formed but forged Demand on ``<p>.v1.demand`` (a router that does not exist claims a
    billion queued requests, valid for an hour) must not make the routers refuse every request for
    the model: requests after it are still served."""
    fleet.configure([FAST])
    router, _ = await asyncio.gather(fleet.router(), fleet.worker("w", "m"))
    await fleet.routed(["w"])
    client = await fleet.client()
    body = chat_body("m", max_tokens=4)
    assert (
        await asyncio.wait_for(client.complete("m", "chat", body), timeout=5)
    ).usage.completion_tokens == 4

    forged = _raw(kind="demand", router_id="router-ghost", model="m", queued=10**9, interval_s=3600.0)
    await fleet.nc.publish(fleet.subjects.demand, forged)
    await fleet.nc.flush()
    after = time.time()
    await eventually(lambda: beat_since(fleet, router, after), timeout=3, what="a router beat after it")
    for _ in range(3):
        try:
            result = await asyncio.wait_for(client.complete("m", "chat", body), timeout=5)
        except errors.FirstError as exc:
            raise AssertionError(f"the caller got {exc.status} {exc.code}: {exc.message}") from None
        assert result.usage.completion_tokens == 4


def _events(lines: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for line in lines:
        counts[line.get("event", "raw")] = counts.get(line.get("event", "raw"), 0) + 1
    return counts
