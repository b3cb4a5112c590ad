"""Workers ended from outside their process without a signal, as real ``first worker`` processes:
a drain or stop on their NATS control subject (how a provider that cannot signal a node, Globus
Compute, releases it), and the walltime of the batch job they run in, before which they drain and
the scaler starts a replacement while demand remains.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from shared import natsauth, schema
from shared.config import load_config
from shared.nodes import read_nodes
from tests.faults.test_scaler_restart import workers_of
from tests.processes import chat_body
from tests.support import eventually

pytestmark = pytest.mark.faults

SLOW = {"kind": "sim", "ttft_ms": 1, "itl_ms": 150}
FAST = {"kind": "sim", "ttft_ms": 1, "itl_ms": 1}


def control(action: str, reason: str = "test") -> bytes:
    return schema.encode(schema.WorkerControl(action=action, reason=reason, sent=time.time()))


def states(fleet, worker_id: str) -> list[str]:
    seen: list[str] = []
    for _, beat in fleet.bus.beats_of(worker_id):
        if not seen or seen[-1] != beat.state:
            seen.append(beat.state)
    return seen


async def test_a_drain_over_nats_finishes_the_answer_in_flight_then_the_worker_exits(fleet):
    """Garbage on the control subject changes nothing; a drain lets the running answer end whole,
    the worker says it is draining (routers send it nothing new), and the process exits 0."""
    fleet.configure([{"id": "m", "engine": SLOW}])
    await fleet.router()
    worker = await fleet.worker("w1", "m")
    await fleet.routed(["w1"])
    client = await fleet.client()
    subject = fleet.subjects.worker_control("w1")

    await fleet.nc.publish(subject, b"\xc1 not msgpack")
    await fleet.nc.publish(subject, schema.encode(schema.Cancel(request_id="x")))  # another message kind
    assert (await client.complete("m", "chat", chat_body("m", max_tokens=2))).worker_id == "w1"

    async with client.open("m", "chat", chat_body("m", max_tokens=12, stream=True)) as answer:
        await eventually(lambda: answer.started, timeout=5, what="the request to start")
        await fleet.nc.publish(subject, control("drain", "node released"))
        chunks = [c async for c in answer if c is not None]
    assert chunks[-1].done and chunks[-1].usage.completion_tokens == 12
    assert await worker.wait(15) == 0
    assert states(fleet, "w1")[-2:] == ["draining", "stopped"]
    told = worker.events("worker_told_to_end")
    assert [(e["action"], e["reason"]) for e in told] == [("drain", "node released")]


async def test_a_stop_over_nats_ends_the_worker_at_once(fleet):
    fleet.configure([{"id": "m", "engine": SLOW}])
    worker = await fleet.worker("w1", "m")
    await fleet.nc.publish(fleet.subjects.worker_control("w1"), control("stop"))
    assert await worker.wait(10) == 0
    assert "draining" not in states(fleet, "w1") and states(fleet, "w1")[-1] == "stopped"


async def test_a_worker_drains_before_its_walltime_ends_and_says_when_in_its_heartbeats(fleet):
    fleet.configure([{"id": "m", "engine": FAST}], worker={"walltime_margin_s": 1.0})
    started = time.time()
    proc = await fleet.first(
        "w1", "worker", "--cluster", "a", "--model", "m", "--worker-id", "w1", "--walltime", "3"
    )
    code = await proc.wait(20)
    beats = [b for _, b in fleet.bus.beats_of("w1")]
    assert code == 0 and beats and beats[-1].state == "stopped"
    drain_at = beats[0].drain_at
    assert started + 2.0 <= drain_at <= started + 2.0 + 5.0  # walltime - margin after it started
    assert proc.events("worker_told_to_end")[0]["reason"] == "the node's walltime is about to end"


@pytest.fixture
async def strays(fleet):
    yield
    for pid in workers_of(fleet):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
async def test_the_scaler_replaces_a_node_before_its_walltime_ends(fleet, strays):
    """A hot model on nodes with an 8 s walltime: its worker drains 1 s before the end, and the
    scaler, 3 s before that, starts a replacement that is ready before the first one drains."""
    fleet.configure(
        [{"id": "m", "engine": FAST, "clusters": ["a"], "scaling": {"min_hot": 1, "max_workers": 2}}],
        scaler={"tick_s": 0.1, "lease_ttl_s": 1.5, "replace_ahead_s": 3.0},
        worker={"walltime_margin_s": 1.0},
    )
    text = fleet.config_path.read_text().replace(
        '[[clusters]]\nname = "a"\n', '[[clusters]]\nname = "a"\nwalltime_s = 8\n'
    )
    fleet.config_path.write_text(text)
    fleet.config = load_config(fleet.config_path)
    await fleet.first("scaler", "scaler")

    def first_ready(worker_id: str) -> float | None:
        return next((t for t, b in fleet.bus.beats_of(worker_id) if b.state == "ready"), None)

    def first_draining(worker_id: str) -> float | None:
        return next((t for t, b in fleet.bus.beats_of(worker_id) if b.state in ("draining", "stopped")), None)

    def ids() -> list[str]:
        return list(dict.fromkeys(b.worker_id for _, b in fleet.bus.heartbeats))

    await eventually(
        lambda: len(ids()) >= 2 and first_ready(ids()[1]), timeout=30, what="a replacement worker"
    )
    old, new = ids()[:2]
    drained = await eventually(lambda: first_draining(old), timeout=15, what="the old worker to drain")
    assert first_ready(new) < drained, "the replacement was not serving when the old worker drained"
    assert all(b.drain_at > 0 for _, b in fleet.bus.beats_of(old))

    bucket = natsauth.scaler_bucket(fleet.config)

    async def old_gone() -> bool:
        entries = await read_nodes(fleet.nc.jetstream(), bucket)
        assert len(entries) <= 2, [e.workers for e in entries]  # one node and its replacement at most
        return not any(old in e.workers for e in entries)

    await eventually(old_gone, timeout=15, what="the old node to leave the table")
