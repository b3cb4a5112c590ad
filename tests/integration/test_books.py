"""The request path's books: ids used once, refusals that stay quiet, usage for every run, several
routers that never over-book a worker, and hostile messages on NATS that change nothing."""

from __future__ import annotations

import asyncio
import time

import msgspec
import orjson
import pytest

from shared import errors, schema
from tests.integration.conftest import make_config, openai_engine
from tests.mock_engine import start as start_mock_engine
from tests.support import eventually

BEAT = {"heartbeat_s": 0.2}


def chat(text: str = "hello there", **extra) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}], **extra})


def infer(subjects, request_id: str, *, attempt: int = 0, model: str = "m") -> schema.InferRequest:
    return schema.InferRequest(
        request_id=request_id,
        model=model,
        endpoint="chat",
        body=chat(max_tokens=1),
        reply_to=subjects.reply_stream("raw", request_id),
        created=time.time(),
        attempt=attempt,
    )


class Inbox:
    """Everything published on a subject, decoded."""

    def __init__(self, decoder):
        self.decoder, self.items = decoder, []

    async def on(self, msg) -> None:
        self.items.append(self.decoder.decode(msg.data))


async def test_a_reused_request_id_gets_a_clear_refusal(services, nc, subjects):
    config = make_config([{"id": "m"}], worker=BEAT)
    await services.router(config)
    await services.worker(config, "m")
    inbox = Inbox(schema.stream_decoder)
    await nc.subscribe(subjects.reply_stream_all("raw"), cb=inbox.on)
    request = schema.encode(infer(subjects, "same"))
    await nc.publish(subjects.infer, request)
    await eventually(lambda: any(isinstance(m, schema.Chunk) and m.done for m in inbox.items), what="answer")
    await nc.publish(subjects.infer, request)  # the same id, the same attempt, once more
    await eventually(lambda: isinstance(inbox.items[-1], schema.Error), what="a refusal")
    assert (inbox.items[-1].code, inbox.items[-1].status) == ("duplicate_request", 409)

    client = await services.client()
    slow = asyncio.create_task(client.complete("m", "chat", chat(max_tokens=5), request_id="mine"))
    await asyncio.sleep(0)
    with pytest.raises(errors.Conflict):
        await client.complete("m", "chat", chat(), request_id="mine")
    assert (await slow).usage.completion_tokens == 5


async def test_a_refused_submit_sends_no_cancel_anywhere(services, nc, subjects):
    await services.router(make_config([{"id": "m"}]))
    cancels = Inbox(schema.cancel_decoder)
    await nc.subscribe(subjects.cancel, cb=cancels.on)
    await nc.subscribe(subjects.worker_cancel_all, cb=cancels.on)
    client = await services.client()
    with pytest.raises(errors.ModelNotFound):
        await client.complete("nope", "chat", chat())
    # A marker sent after it on the client's own connection arrives after any cancel it sent.
    await client.nc.publish(subjects.cancel, schema.encode(schema.Cancel("marker")))
    await eventually(lambda: cancels.items, what="the marker")
    assert [c.request_id for c in cancels.items] == ["marker"]


async def test_a_caller_may_retry_a_refused_request_under_the_same_id(services):
    config = make_config([{"id": "m", "queue_timeout_s": 30}], router={"max_queue": 1}, worker=BEAT)
    router = await services.router(config)
    client = await services.client()
    first = asyncio.create_task(client.complete("m", "chat", chat(max_tokens=1)))
    await eventually(lambda: len(router.queues["m"]) == 1, what="one held")
    with pytest.raises(errors.NoCapacity, match="too many"):
        await client.complete("m", "chat", chat(), request_id="again")
    await services.worker(config, "m")
    await first
    assert (
        await client.complete("m", "chat", chat(max_tokens=2), request_id="again")
    ).usage.completion_tokens == 2


async def test_every_run_leaves_one_usage_record_with_the_tokens_it_made(services, nc, subjects):
    slow = {"kind": "sim", "ttft_ms": 1, "itl_ms": 50, "default_max_tokens": 40}
    config = make_config([{"id": "m", "engine": slow}], worker=BEAT)
    await services.router(config)
    await services.worker(config, "m", worker_id="w")
    usage = Inbox(schema.usage_decoder)
    await nc.subscribe(subjects.usage, cb=usage.on)
    client = await services.client()
    ok = await client.complete("m", "chat", chat(max_tokens=3), request_id="ok")
    async with client.open("m", "chat", chat(stream=True), request_id="left") as answer:
        seen = 0
        async for chunk in answer:
            seen += sum(1 for d in chunk.deltas if d.text)
            if seen >= 4:
                break  # the caller leaves mid-answer
    await eventually(lambda: {u.request_id for u in usage.items} == {"ok", "left"}, what="two records")
    by_id = {u.request_id: u for u in usage.items}
    assert by_id["ok"].outcome == "ok" and by_id["ok"].completion_tokens == ok.usage.completion_tokens == 3
    left = by_id["left"]
    assert left.outcome == "cancelled" and 4 <= left.completion_tokens < 40 and left.prompt_tokens == 2
    assert left.worker_id == "w" and left.ttft_s is not None


async def test_an_engine_failure_is_a_502_and_a_usage_record(services, nc, subjects):
    async with await start_mock_engine(models=["served"]) as mock:
        config = make_config([{"id": "m", "engine": openai_engine(mock.url, "served")}], worker=BEAT)
        await services.router(config)
        await services.worker(config, "m")
        usage = Inbox(schema.usage_decoder)
        await nc.subscribe(subjects.usage, cb=usage.on)
        client = await services.client()
        with pytest.raises(errors.EngineError) as info:
            await client.complete("m", "chat", chat(mock_status=500), request_id="broken")
        assert info.value.status == 502 and "Traceback" not in info.value.message
        with pytest.raises(errors.NoCapacity) as busy:
            await client.complete("m", "chat", chat(mock_status=429))
        assert busy.value.status == 503 and busy.value.retry_after_s == 3
        with pytest.raises(errors.BadRequest):
            await client.complete("m", "chat", chat(mock_status=400))
        await eventually(lambda: len(usage.items) == 3, what="three records")
        assert usage.items[0].request_id == "broken" and usage.items[0].outcome == "engine_error"


async def test_a_wrong_served_model_tells_an_operator_what_to_fix(services):
    async with await start_mock_engine(models=["the-real-name"]) as mock:
        config = make_config([{"id": "m", "engine": openai_engine(mock.url, "a-typo")}], worker=BEAT)
        await services.router(config)
        await services.worker(config, "m")
        client = await services.client()
        with pytest.raises(errors.EngineError, match="served_model") as info:
            await client.complete("m", "chat", chat())
        assert info.value.status == 502 and "a-typo" in info.value.message


async def test_three_routers_share_one_worker_without_over_booking_it(services):
    engine = {"kind": "sim", "ttft_ms": 1, "itl_ms": 5, "default_max_tokens": 6}
    config = make_config([{"id": "m", "capacity": 2, "engine": engine, "queue_timeout_s": 30}], worker=BEAT)
    for _ in range(3):
        await services.router(config)
    worker = await services.worker(config, "m")
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, worker.in_flight)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    clients = [await services.client() for _ in range(3)]
    calls = [clients[i % 3].complete("m", "chat", chat(f"q{i}", max_tokens=6)) for i in range(30)]
    results = await asyncio.wait_for(asyncio.gather(*calls), 20)
    watcher.cancel()
    assert all(r.usage.completion_tokens == 6 for r in results)
    assert peak == 2, f"the worker ran {peak} at once; its capacity is 2"


async def test_the_queue_bound_holds_across_routers(services):
    config = make_config([{"id": "m", "queue_timeout_s": 30}], router={"max_queue": 4})
    routers = [await services.router(config), await services.router(config)]
    client = await services.client()
    held = []
    for i in range(4):
        held.append(asyncio.create_task(client.complete("m", "chat", chat(f"h{i}"))))
        # Each router learns the other's queue from Demand; wait for it before the next.
        await eventually(
            lambda n=i + 1: all(len(r.queues["m"]) + r.view.demand.queued("m") == n for r in routers),
            what=f"{i + 1} held, known to both routers",
        )
    for _ in range(4):  # whichever router takes them, the deployment holds 4 at most
        with pytest.raises(errors.NoCapacity, match="too many"):
            await client.complete("m", "chat", chat("over"))
    for call in held:
        call.cancel()


HOSTILE_BEATS = [
    {"worker_id": "evil.worker"},
    {"worker_id": ">"},
    {"capacity": 0},
    {"interval_s": float("nan")},
    {"in_flight": -5},
    {"engine": {"waiting": "many"}},
]


async def test_hostile_messages_on_nats_change_nothing_for_callers(services, nc, subjects):
    config = make_config([{"id": "m"}], worker=BEAT)
    router = await services.router(config)
    await services.worker(config, "m")
    client = await services.client()
    assert (await client.complete("m", "chat", chat(max_tokens=1))).usage.completion_tokens == 1

    good = {"kind": "heartbeat", "worker_id": "w", "cluster": "a", "model": "m", "state": "ready"}
    good |= {"capacity": 1, "in_flight": 0, "interval_s": 1.0}
    for hostile in HOSTILE_BEATS:
        await nc.publish(subjects.heartbeat("a", "x"), msgspec.msgpack.encode(good | hostile))
    junk = [
        b"",
        b"\x00\xff",
        b"\x81\xa4kind\xa5infer",
        msgspec.msgpack.encode({"kind": "infer", "request_id": "a.b"}),
    ]
    for data in junk:
        for subject in (subjects.infer, subjects.heartbeat("a", "y"), subjects.cancel, subjects.demand):
            await nc.publish(subject, data)
        await nc.publish(subjects.router_ack(router.router_id, 7), data)
        await nc.publish(subjects.router_ack_all(router.router_id).replace("*", "x"), data)
    errors_seen = Inbox(schema.stream_decoder)
    await nc.subscribe(subjects.reply_stream_all("raw"), cb=errors_seen.on)
    await nc.publish(subjects.infer, b"\x00garbage", reply=subjects.reply_stream("raw", "g"))
    await nc.flush()
    await eventually(lambda: errors_seen.items, what="a refusal of the garbage")
    assert errors_seen.items[0].status == 400

    assert router.registry.get("w") is None and router.registry.get("evil.worker") is None
    results = await asyncio.gather(
        *(client.complete("m", "chat", chat(f"after{i}", max_tokens=2)) for i in range(5))
    )
    assert all(r.usage.completion_tokens == 2 for r in results)


async def test_garbage_engine_metrics_never_stop_the_heartbeats(services, nc, subjects):
    """NaN gauges once killed the heartbeat loop for good; the worker then looked dead to routers."""
    async with await start_mock_engine(models=["served"], metrics="garbage") as mock:
        engine = openai_engine(mock.url, "served", metrics_path="/metrics")
        config = make_config([{"id": "m", "engine": engine}], worker={"heartbeat_s": 0.1})
        await services.router(config)
        beats = Inbox(schema.heartbeat_decoder)
        await nc.subscribe(subjects.heartbeat_all, cb=beats.on)
        await services.worker(config, "m")
        await eventually(lambda: sum(b.state == "ready" for b in beats.items) >= 5, what="five ready beats")
        client = await services.client()
        assert (await client.complete("m", "chat", chat(max_tokens=2))).usage.completion_tokens == 2
