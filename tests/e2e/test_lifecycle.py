"""Workers coming and going under ``first up``: cold start, disconnects, killed and draining workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import aiohttp
import orjson

from tests.support import eventually

MESSAGES = [{"role": "user", "content": "hello"}]


async def model_status(first_client, model: str):
    return next(m for m in (await first_client.status()).models if m.id == model)


def worker_pid(worker_id: str) -> int:
    """The pid of the ``first worker`` process the scaler started with this id."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"worker" in argv and b"--worker-id" in argv and worker_id.encode() in argv:
                pids.append(int(proc.name))
    assert len(pids) == 1, f"expected one process for {worker_id}, found {pids}"
    return pids[0]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_cold_model_starts_a_worker_and_answers(oai, first_client):
    assert (await model_status(first_client, "sim/cold")).state == "offline"
    answer = await oai.chat.completions.create(model="sim/cold", messages=MESSAGES, max_tokens=4)
    assert answer.usage.completion_tokens == 4
    status = await model_status(first_client, "sim/cold")
    assert status.state == "live" and [w.cluster for w in status.workers] == ["sophia"]


async def test_client_disconnect_frees_the_workers_slot(sim_stack, oai, first_client):
    body = {"model": "sim/slow", "messages": MESSAGES, "max_tokens": 30, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(sim_stack.base_url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            await r.content.readline()  # the first event: the request is on the engine

            async def busy() -> bool:
                return (await model_status(first_client, "sim/slow")).workers[0].in_flight == 1

            await eventually(busy, timeout=3, what="the worker to report the request")
        # Leaving the block closed the connection, 30 tokens (15 s) before the answer's end.

    async def slot_free() -> bool:
        return (await model_status(first_client, "sim/slow")).workers[0].in_flight == 0

    await eventually(slot_free, timeout=3, what="the worker's slot to be freed")
    quick = await asyncio.wait_for(
        oai.chat.completions.create(model="sim/slow", messages=MESSAGES, max_tokens=1), timeout=5
    )
    assert quick.usage.completion_tokens == 1


async def test_killed_worker_stops_receiving_requests(oai, first_client):
    async def two_ready():
        workers = (await model_status(first_client, "sim/pair")).workers
        ready = [w.worker_id for w in workers if w.state == "ready"]
        return ready if len(ready) == 2 else None

    victim = (await eventually(two_ready, what="two ready sim/pair workers"))[0]
    os.kill(worker_pid(victim), signal.SIGKILL)  # no last heartbeat, no goodbye
    for _ in range(6):  # served throughout, also before the router has noticed
        answer = await oai.chat.completions.create(model="sim/pair", messages=MESSAGES, max_tokens=2)
        assert answer.usage.completion_tokens == 2

    async def forgotten():
        return victim not in {w.worker_id for w in (await model_status(first_client, "sim/pair")).workers}

    await eventually(forgotten, timeout=5, what=f"{victim} forgotten after its heartbeats stopped")
    body = orjson.dumps({"model": "sim/pair", "messages": MESSAGES, "max_tokens": 2})
    for _ in range(6):
        assert (await first_client.complete("sim/pair", "chat", body)).worker_id != victim


async def test_draining_worker_finishes_what_it_has(oai, first_client):
    body = orjson.dumps(
        {"model": "sim/pair", "prompt": "a long story", "max_tokens": 25, "seed": 11, "stream": True}
    )
    async with first_client.open("sim/pair", "completion", body) as answer:
        chunks = [await anext(aiter(answer))]
        worker_id = answer.started.worker_id
        pid = worker_pid(worker_id)
        os.kill(pid, signal.SIGTERM)  # what a batch system sends at the end of a node's time
        chunks += [c async for c in answer]
    tokens = [d for c in chunks for d in c.deltas if d.text]
    assert chunks[-1].done and chunks[-1].usage.completion_tokens == len(tokens) >= 8
    assert [d.finish_reason for c in chunks for d in c.deltas if d.finish_reason] in (["stop"], ["length"])
    await eventually(lambda: not alive(pid), timeout=10, what="the drained worker to exit")
    answer = await oai.chat.completions.create(model="sim/pair", messages=MESSAGES, max_tokens=2)
    assert answer.usage.completion_tokens == 2
