"""Router and workers in this process, real NATS between them, requests through the NATS-native client."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from shared import errors, schema
from tests.integration.conftest import make_config
from tests.support import eventually


def chat(text: str = "hello there", **extra) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}], **extra})


async def test_answer_streams_in_order_and_ends_with_usage(services):
    config = make_config([{"id": "m"}])
    await services.router(config)
    worker = await services.worker(config, "m")
    client = await services.client()
    async with client.open("m", "chat", chat(max_tokens=5, stream=True)) as answer:
        chunks = [c async for c in answer]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].done and chunks[-1].usage == schema.Usage(prompt_tokens=2, completion_tokens=5)
    assert answer.started.worker_id == worker.worker_id
    text = "".join(d.text for c in chunks for d in c.deltas)
    assert len(text.split()) == 5


async def test_unknown_model_is_refused_at_once(services):
    await services.router(make_config([{"id": "m"}]))
    client = await services.client()
    with pytest.raises(errors.ModelNotFound) as info:
        await client.complete("nope", "chat", chat())
    assert info.value.status == 404 and info.value.param == "model"


async def test_no_router_means_503_not_a_hang(services):
    client = await services.client(accept_timeout_s=2)
    with pytest.raises(errors.NoCapacity, match="no router"):
        await client.complete("m", "chat", chat())


async def test_request_for_a_cold_model_waits_and_announces_demand(services, nc, subjects):
    config = make_config([{"id": "m"}])
    await services.router(config)
    demands: list[schema.Demand] = []

    async def on_demand(msg):
        demands.append(schema.demand_decoder.decode(msg.data))

    await nc.subscribe(subjects.demand, cb=on_demand)
    client = await services.client()
    pending = asyncio.create_task(client.complete("m", "chat", chat(max_tokens=3)))
    await eventually(lambda: any(d.model == "m" and d.queued == 1 for d in demands), what="demand for m")
    assert not pending.done()
    await services.worker(config, "m")  # the node arrives
    result = await asyncio.wait_for(pending, 10)
    assert result.usage.completion_tokens == 3
    await eventually(lambda: demands[-1].queued == 0, what="demand back to zero")


async def test_held_request_gets_503_with_retry_after_when_no_worker_comes(services):
    config = make_config([{"id": "m", "queue_timeout_s": 0.3}], router={"retry_after_s": 7})
    await services.router(config)
    client = await services.client()
    with pytest.raises(errors.NoCapacity) as info:
        await client.complete("m", "chat", chat())
    assert info.value.status == 503 and info.value.retry_after_s == 7


async def test_full_queue_refuses_at_once(services):
    config = make_config([{"id": "m", "queue_timeout_s": 30}], router={"max_queue": 1})
    router = await services.router(config)
    client = await services.client()
    first = asyncio.create_task(client.complete("m", "chat", chat()))
    await eventually(lambda: len(router.queues["m"]) == 1, what="the first request held")
    with pytest.raises(errors.NoCapacity, match="too many requests"):
        await asyncio.wait_for(client.complete("m", "chat", chat()), 5)
    first.cancel()


async def test_cancel_frees_the_workers_slot(services):
    slow = {"kind": "sim", "ttft_ms": 1, "itl_ms": 200, "default_max_tokens": 30}
    config = make_config([{"id": "m", "capacity": 1, "engine": slow}])
    await services.router(config)
    worker = await services.worker(config, "m")
    client = await services.client()
    async with client.open("m", "chat", chat(stream=True)) as answer:
        async for _ in answer:
            break  # the caller leaves after the first token
    await eventually(lambda: worker.in_flight == 0, timeout=2, what="the slot to be freed")
    fast = orjson.dumps({"model": "m", "prompt": "x", "max_tokens": 1})
    result = await asyncio.wait_for(client.complete("m", "completion", fast), 5)
    assert result.usage.completion_tokens == 1


async def test_fast_tokens_are_packed_into_fewer_messages(services):
    engine = {"kind": "sim", "ttft_ms": 0, "itl_ms": 1, "default_max_tokens": 40}
    body = orjson.dumps({"model": "m", "prompt": "pack me", "seed": 3, "stream": True})
    config = make_config([{"id": "m", "engine": engine}], worker={"heartbeat_s": 0.2, "pack_interval_ms": 20})
    await services.router(config)
    await services.worker(config, "m")
    client = await services.client()
    async with client.open("m", "completion", body) as answer:
        chunks = [c async for c in answer]
    tokens = chunks[-1].usage.completion_tokens
    assert len(chunks) < tokens / 2, f"{len(chunks)} messages for {tokens} tokens"
    unpacked = await client.complete("m", "completion", body)
    assert "".join(d.text for c in chunks for d in c.deltas) == unpacked.texts[0]


async def test_draining_worker_finishes_its_request_and_takes_no_new_one(services):
    engine = {"kind": "sim", "ttft_ms": 1, "itl_ms": 30, "default_max_tokens": 20}
    config = make_config([{"id": "m", "engine": engine}])
    await services.router(config)
    first = await services.worker(config, "m", worker_id="first")
    client = await services.client()
    async with client.open("m", "chat", chat(seed=1, stream=True)) as answer:
        chunks = [await anext(aiter(answer))]
        assert answer.started.worker_id == "first"
        draining = asyncio.create_task(first.drain())
        await eventually(lambda: first.state == "draining", what="draining")
        await services.worker(config, "m", worker_id="second")
        other = await client.complete("m", "chat", chat("another"))
        assert other.worker_id == "second"
        chunks += [c async for c in answer]
    assert chunks[-1].done and chunks[-1].usage.completion_tokens == 20
    await asyncio.wait_for(draining, 5)
    assert first.state == "stopped"


async def test_worker_that_stops_is_forgotten_and_requests_go_elsewhere(services):
    config = make_config([{"id": "m"}])
    router = await services.router(config)
    gone = await services.worker(config, "m", worker_id="gone")
    await services.worker(config, "m", worker_id="stays")
    await eventually(lambda: len(router.registry.workers("m")) == 2, what="two workers")
    await gone.stop()
    await eventually(lambda: len(router.registry.workers("m")) == 1, what="the stopped worker forgotten")
    client = await services.client()
    for _ in range(4):
        assert (await client.complete("m", "chat", chat())).worker_id == "stays"


async def test_a_cancel_that_overtakes_its_request_still_stops_it(services, nc, subjects):
    """The caller left while a router was handing the request over: the worker must not run it."""
    config = make_config([{"id": "m"}])
    worker = await services.worker(config, "m", worker_id="w")
    await nc.publish(subjects.worker_cancel("w"), schema.encode(schema.Cancel("late-request")))
    await nc.flush()
    request = schema.InferRequest(
        request_id="late-request",
        model="m",
        endpoint="chat",
        body=chat(),
        reply_to=subjects.reply_stream("gone", "late-request"),
        created=0.0,
    )
    await eventually(lambda: worker._cancelled.stops(request), what="the worker to hear the cancel")
    msg = await nc.request(subjects.worker_infer("w"), schema.encode(request), timeout=2)
    reply = schema.dispatch_reply_decoder.decode(msg.data)
    assert (reply.accepted, reply.reason) == (False, schema.CANCELLED)
    assert worker.in_flight == 0


async def test_a_quick_answer_carries_its_started_and_a_slow_one_sends_it_first(services, nc, subjects):
    """One message fewer per request when the engine answers at once; a caller whose answer is slow
    to begin still hears within moments which worker to watch."""
    quick = {"kind": "sim", "ttft_ms": 0, "itl_ms": 0}
    slow = {"kind": "sim", "ttft_ms": 400, "itl_ms": 0}
    config = make_config([{"id": "m", "engine": quick}, {"id": "slow", "engine": slow}])
    await services.router(config)
    await services.worker(config, "m", worker_id="q")
    await services.worker(config, "slow", worker_id="s")
    client = await services.client()
    seen: list = []

    async def on_reply(msg):
        seen.append(schema.stream_decoder.decode(msg.data))

    await nc.subscribe(subjects.reply_stream_all(client.client_id), cb=on_reply)
    result = await client.complete("m", "chat", chat(max_tokens=3))
    await eventually(lambda: seen, what="the answer on the wire")
    assert result.worker_id == "q" and [type(m).__name__ for m in seen] == ["Chunk"]
    assert seen[0].started.worker_id == "q"
    seen.clear()
    body = orjson.dumps({"model": "slow", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    call = asyncio.create_task(client.complete("slow", "chat", body))
    await eventually(lambda: seen, timeout=0.3, what="Started before the text")
    assert isinstance(seen[0], schema.Started) and seen[0].worker_id == "s"
    assert (await call).worker_id == "s"
