"""Routers and workers that die or answer late, in this process: what the caller sees, and when.

"Dies" here is the abrupt end of the service's NATS connection: its subscriptions vanish and it
sends nothing more, as after a SIGKILL (tests/faults does the same with real processes).
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from shared import errors, schema
from tests.integration.conftest import make_config
from tests.support import eventually

# Short intervals, so that failures show quickly; not shorter, since every service of a test shares
# this process's one event loop.
FAST = {"heartbeat_s": 0.2, "missed_heartbeats": 3, "dispatch_timeout_s": 0.5}
BEAT = {"heartbeat_s": 0.2}


def chat(text: str = "hello there", **extra) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}], **extra})


async def die(service) -> None:
    """Cut a service off NATS at once, with no goodbye."""
    await service.nc.close()


async def test_requests_held_by_a_router_that_dies_are_served_through_another(services):
    config = make_config([{"id": "m", "queue_timeout_s": 30}], router=FAST, worker=BEAT)
    first = await services.router(config)
    second = await services.router(config)
    client = await services.client()
    calls = [
        asyncio.create_task(client.complete("m", "chat", chat(f"r{i}", max_tokens=2))) for i in range(12)
    ]
    await eventually(lambda: len(first.queues["m"]) + len(second.queues["m"]) == 12, what="all held")
    victim, survivor = (first, second) if len(first.queues["m"]) else (second, first)
    lost = len(victim.queues["m"])
    await die(victim)
    killed = time.monotonic()
    # The callers notice within three of the router's heartbeat intervals and go to the survivor.
    await eventually(lambda: len(survivor.queues["m"]) == 12, timeout=3, what=f"{lost} requests re-submitted")
    assert time.monotonic() - killed < 3 * 0.2 + 1.0
    await services.worker(config, "m")
    results = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert all(r.usage.completion_tokens == 2 for r in results)


async def test_with_no_router_left_held_requests_end_with_503_quickly(services):
    config = make_config([{"id": "m", "queue_timeout_s": 30}], router=FAST)
    router = await services.router(config)
    client = await services.client()
    call = asyncio.create_task(client.complete("m", "chat", chat()))
    await eventually(lambda: len(router.queues["m"]) == 1, what="the request held")
    await die(router)
    killed = time.monotonic()
    with pytest.raises(errors.NoCapacity, match="no router") as info:
        await asyncio.wait_for(call, 5)
    assert info.value.retry_after_s and time.monotonic() - killed < 3 * 0.2 + 1.0


async def test_a_worker_that_dies_before_its_first_token_hands_the_request_on(services):
    slow_start = {"kind": "sim", "ttft_ms": 2000, "itl_ms": 1}
    config = make_config([{"id": "m", "engine": slow_start}], router=FAST, worker=BEAT)
    await services.router(config)
    workers = {w.worker_id: w for w in [await services.worker(config, "m") for _ in range(2)]}
    client = await services.client()
    async with client.open("m", "chat", chat(max_tokens=3, stream=True)) as answer:
        chunks = answer.__aiter__()
        first = asyncio.create_task(anext(chunks))
        await eventually(lambda: answer.started is not None, what="a worker took it")
        victim = answer.started.worker_id
        await die(workers[victim])
        killed = time.monotonic()
        rest = [await asyncio.wait_for(first, 5)] + [c async for c in chunks]
        took = time.monotonic() - killed
    assert answer.started.worker_id != victim
    assert rest[-1].done and rest[-1].usage.completion_tokens == 3
    assert took < 3 * 0.2 + 0.5 + 2.0, "noticed within three heartbeats, then one more cold token"


async def test_a_worker_that_dies_mid_answer_ends_it_with_an_error_within_three_heartbeats(services):
    slow = {"kind": "sim", "ttft_ms": 1, "itl_ms": 300, "default_max_tokens": 30}
    config = make_config([{"id": "m", "engine": slow}], router=FAST, worker={"heartbeat_s": 0.2})
    await services.router(config)
    worker = await services.worker(config, "m")
    client = await services.client(stall_timeout_s=60)
    async with client.open("m", "chat", chat(stream=True)) as answer:
        chunks = answer.__aiter__()
        await anext(chunks)
        await die(worker)
        killed = time.monotonic()
        with pytest.raises(errors.EngineError, match="stopped answering"):
            async for _ in chunks:
                pass
    assert time.monotonic() - killed < 3 * 0.2 + 0.5


async def test_a_late_dispatch_reply_never_makes_a_second_answer(services, nc, subjects):
    """A worker that takes a dispatch after the router gave up on it: the caller keeps the answer
    of the attempt it is on, and the late run is cancelled."""
    config = make_config([{"id": "m"}], router=FAST, worker=BEAT)
    await services.router(config)
    dispatched: list = []
    cancels: list[schema.Cancel] = []

    async def on_dispatch(msg):
        dispatched.append(msg)

    async def on_cancel(msg):
        cancels.append(schema.cancel_decoder.decode(msg.data))

    await nc.subscribe(subjects.worker_infer("sleepy"), cb=on_dispatch)
    await nc.subscribe(subjects.worker_cancel("sleepy"), cb=on_cancel)
    beat = schema.Heartbeat("sleepy", "a", "m", "ready", 1, 0, 10.0)
    client = await services.client()
    call = asyncio.create_task(client.complete("m", "chat", chat(max_tokens=2)))

    async def chosen() -> bool:  # it beats as a worker does, so a beat the router missed is no matter
        if not dispatched:
            await nc.publish(subjects.heartbeat("a", "sleepy"), schema.encode(beat))
        return bool(dispatched)

    await eventually(chosen, what="the sleepy worker to be chosen")
    await services.worker(config, "m", worker_id="awake")  # the router's Retry sends it here
    result = await asyncio.wait_for(call, 5)
    assert result.worker_id == "awake" and result.usage.completion_tokens == 2

    # Now the sleepy worker wakes up, accepts, and starts answering attempt 0.
    late = schema.infer_decoder.decode(dispatched[0].data)
    await nc.publish(dispatched[0].reply, schema.encode(schema.DispatchReply(True, in_flight=1)))
    await nc.publish(late.reply_to, schema.encode(schema.Started(late.request_id, "sleepy", "a", 10.0)))
    await nc.publish(late.reply_to, schema.encode(schema.Chunk(late.request_id, 0, [schema.Delta("late")])))
    await eventually(lambda: cancels, what="the late run to be cancelled")
    assert (cancels[0].request_id, cancels[0].attempt) == (late.request_id, 0)


async def test_a_slow_worker_does_not_hold_up_the_requests_behind_it(services, nc, subjects):
    """Dispatch is not serial: while one dispatch waits for a worker that never answers, the
    other requests of the model go to a worker that does."""
    config = make_config([{"id": "m"}], router={**FAST, "dispatch_timeout_s": 5})
    await services.router(config)
    stuck: list = []

    async def swallow(msg):
        stuck.append(msg)

    await nc.subscribe(subjects.worker_infer("stuck"), cb=swallow)
    beat = schema.Heartbeat("stuck", "a", "m", "ready", 1, 0, 10.0)
    await nc.publish(subjects.heartbeat("a", "stuck"), schema.encode(beat))
    await services.worker(config, "m", worker_id="fine")
    client = await services.client()
    calls = [asyncio.create_task(client.complete("m", "chat", chat(f"q{i}", max_tokens=1))) for i in range(8)]
    await eventually(lambda: sum(c.done() for c in calls) >= 7, timeout=2, what="7 of 8 answered")
    assert len(stuck) <= 1, "a worker that does not answer gets no second request"
    assert all(c.result().worker_id == "fine" for c in calls if c.done())
    for c in calls:
        c.cancel()


async def test_nats_trouble_at_the_caller_is_a_503_with_retry_after_not_a_500(services):
    config = make_config([{"id": "m"}])
    await services.router(config)
    client = await services.client()
    await client.nc.close()  # the connection is gone (a server that went away, a closed client)
    with pytest.raises(errors.NoCapacity, match="message bus is unavailable") as info:
        await client.complete("m", "chat", chat())
    assert info.value.status == 503 and info.value.retry_after_s
    with pytest.raises(errors.NoCapacity):
        await client.status()
