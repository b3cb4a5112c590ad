"""The scaler's node table and lease in JetStream KV, its nodes of several workers, its hot-node
policy and its back-off, against a real nats-server, with real workers where heartbeats matter.

``TableProvider`` is a thin double for a batch system (Slurm, PBS and Globus cannot run here): it
keeps a job table, reports what the test sets, and adopts the jobs it is told of. Demand comes
as the routers send it (Demand messages on the demand subject).
"""

from __future__ import annotations

import asyncio
import time

from services.scaler.nodetable import NodeTable
from services.scaler.providers.base import NodeProvider, NodeSpec
from services.scaler.service import Scaler
from shared import events as shared_events
from shared import natsauth, schema
from shared.lease import KEY, Lease
from shared.nodes import read_nodes
from tests.integration.conftest import make_config
from tests.support import eventually


class TableProvider(NodeProvider):
    name = "table"

    def __init__(self, *, fail_starts: bool = False, fail_polls: bool = False):
        self.fail_starts, self.fail_polls = fail_starts, fail_polls
        self.attempts = self.polls = 0
        self.jobs: dict[str, tuple[NodeSpec, schema.NodeState, str]] = {}
        self.requested: list[NodeSpec] = []
        self.stopped: list[str] = []
        self.adopted: list[tuple[str, str]] = []

    async def start_node(self, spec: NodeSpec) -> None:
        self.attempts += 1
        if self.fail_starts:
            raise RuntimeError("sbatch: error: Batch job submission failed: Invalid account")
        self.requested.append(spec)
        self.jobs[spec.node_id] = (spec, "requested", "")

    def set(self, node_id: str, state: schema.NodeState, reason: str = "") -> None:
        self.jobs[node_id] = (self.jobs[node_id][0], state, reason)

    async def stop_node(self, node_id: str) -> None:
        self.stopped.append(node_id)
        if node_id in self.jobs:
            self.set(node_id, "stopped")

    async def poll(self) -> dict[str, tuple[schema.NodeState, str]]:
        self.polls += 1
        if self.fail_polls:
            raise OSError("squeue: error: slurm_load_jobs error: Unable to contact slurm controller")
        out = {node_id: (state, reason) for node_id, (_, state, reason) in self.jobs.items()}
        self.jobs = {n: j for n, j in self.jobs.items() if j[1] not in ("stopped", "failed")}
        return out

    def details(self) -> dict[str, dict]:
        return {
            n: {"job_id": f"job-{n}", "job_state": state.upper()} for n, (_, state, _) in self.jobs.items()
        }

    async def adopt(self, spec: NodeSpec, job_id: str) -> bool:
        self.adopted.append((spec.node_id, job_id))
        self.jobs[spec.node_id] = (spec, "running", "")
        return True

    async def forget(self) -> None:
        self.jobs.clear()

    async def close(self) -> None:
        for node_id in list(self.jobs):
            await self.stop_node(node_id)


async def demand(nc, subjects, model: str, queued: int) -> None:
    message = schema.Demand(router_id="r1", model=model, queued=queued, interval_s=5.0)
    await nc.publish(subjects.demand, schema.encode(message))
    await nc.flush()


async def node_events(nc, subjects) -> list[schema.Event]:
    seen: list[schema.Event] = []

    async def on_event(msg):
        seen.append(shared_events.decode(msg.data))

    await nc.subscribe(subjects.node_events, cb=on_event)
    await nc.flush()
    return seen


async def scaler(services, config, providers, **kw) -> Scaler:
    s = Scaler(await services.connect(), services.subjects, config, providers, **kw)
    await services.stack.enter_async_context(s)  # stopped at the test's end, not left running
    return s


# --- the lease ------------------------------------------------------------------------------------


async def test_one_scaler_holds_the_lease_and_a_standby_takes_it_only_once_it_stops_moving(nc, subjects):
    table = await NodeTable.open(nc.jetstream(), f"{subjects.prefix}_scaler")
    a, b = Lease(table.kv, "scaler-a", 1.0), Lease(table.kv, "scaler-b", 1.0)
    assert await a.keep() and not await b.keep()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # a renews (every ttl/3): b never gets it
        assert await a.keep() and not await b.keep()
        await asyncio.sleep(0.05)

    # a stops renewing (frozen, dead): b takes it after ttl of no movement, and a's next renewal,
    # a revision-checked update, fails: it stands down instead of acting beside b.
    taken = await eventually(b.keep, timeout=5, what="the standby to take the lease")
    assert taken and not await a.keep()
    assert schema.lease_decoder.decode((await table.kv.get(KEY)).value).holder == "scaler-b"

    await b.hand_back()  # an orderly stop: a takes it without waiting out the ttl
    assert await a.keep()


# --- adoption, table, events ----------------------------------------------------------------------


async def test_a_scaler_that_takes_over_adopts_the_table_and_starts_nothing_twice(services, nc, subjects):
    config = make_config(
        [{"id": "m", "clusters": ["a"], "scaling": {"min_hot": 1}}],
        scaler={"tick_s": 0.05, "lease_ttl_s": 0.5},
    )
    first_provider = TableProvider()
    first = await scaler(services, config, {"a": first_provider}, release_on_stop=False)
    [spec] = await eventually(lambda: first_provider.requested, what="the hot node")
    first_provider.set(spec.node_id, "running")
    bucket = natsauth.scaler_bucket(config, subjects.prefix)

    async def entry_running():
        entries = await read_nodes(nc.jetstream(), bucket)
        return entries if entries and entries[0].state == "running" else None

    [entry] = await eventually(entry_running, what="the node's entry")
    assert (entry.workers, entry.job_id, entry.job_state) == (
        list(spec.workers),
        f"job-{spec.node_id}",
        "RUNNING",
    )
    await services.worker(config, "m", worker_id=spec.workers[0], node_id=spec.node_id)
    await first.stop()  # hands the lease back; the node stays
    assert first_provider.stopped == []

    second_provider = TableProvider()
    second = await scaler(services, config, {"a": second_provider})
    try:
        await eventually(lambda: second_provider.adopted, what="the adoption")
        assert second_provider.adopted == [(spec.node_id, f"job-{spec.node_id}")]
        await asyncio.sleep(0.3)  # six ticks
        assert second_provider.requested == [] and list(second.nodes) == [spec.node_id]
    finally:
        await second.stop()  # release_on_stop: the node is stopped and its entry removed
    assert second_provider.stopped == [spec.node_id]
    assert await read_nodes(nc.jetstream(), bucket) == []


async def test_a_node_stuck_in_the_batch_queue_is_released_after_the_start_timeout_with_its_reason(
    services, nc, subjects
):
    config = make_config([{"id": "m", "clusters": ["a"]}], scaler={"tick_s": 0.05, "start_timeout_s": 0.5})
    seen = await node_events(nc, subjects)
    provider = TableProvider()
    await scaler(services, config, {"a": provider})
    await demand(nc, subjects, "m", 1)
    [spec] = await eventually(lambda: provider.requested, what="a node request")
    provider.set(spec.node_id, "queued", "Priority")

    def named(name):
        return [e for e in seen if e.node_id == spec.node_id and e.name == name]

    [queued] = await eventually(lambda: named("queued"), what="the queued event")
    assert queued.reason == "Priority"
    [stopping] = await eventually(lambda: named("stopping"), what="the release")
    assert stopping.reason == "no heartbeat within 0.5 s (queued: Priority)"
    assert provider.stopped == [spec.node_id]
    await eventually(lambda: named("released"), what="the released event")


async def test_a_failing_provider_is_reported_and_backs_off_instead_of_retrying_every_tick(
    services, nc, subjects
):
    config = make_config(
        [{"id": "m", "clusters": ["a"]}], scaler={"tick_s": 0.02, "backoff_s": 0.5, "backoff_max_s": 60}
    )
    seen = await node_events(nc, subjects)
    provider = TableProvider(fail_starts=True)
    s = await scaler(services, config, {"a": provider})
    await demand(nc, subjects, "m", 1)
    failed = await eventually(
        lambda: [e for e in seen if e.name == "failed" and not e.node_id], what="a report"
    )
    assert "Invalid account" in failed[0].reason and failed[0].cluster == "a"
    await asyncio.sleep(1.2)  # 60 ticks: back-offs of 0.5 s and 1 s allow two more tries at most
    assert 1 <= provider.attempts <= 3
    assert s.fleet.backoff.failures("a") == provider.attempts


# --- nodes of several workers ---------------------------------------------------------------------


async def test_a_node_of_two_workers_gets_two_slots_and_is_drained_and_released_whole(services, nc, subjects):
    """Not while one of its workers is busy, though the other has idled past idle_s."""
    config = make_config(
        [
            {
                "id": "m",
                "engine": {"kind": "sim", "ttft_ms": 1, "itl_ms": 100},
                "clusters": ["a"],
                "capacity": 1,
                "scaling": {"max_workers": 2, "idle_s": 0.3, "workers_per_node": 2},
            }
        ],
        scaler={"tick_s": 0.05},
    )
    provider = TableProvider()
    await services.router(config)
    await scaler(services, config, {"a": provider})
    await demand(nc, subjects, "m", 2)
    [spec] = await eventually(lambda: provider.requested, what="one node for two workers")
    assert spec.workers == ("a-n0", "a-n1") and spec.node_id not in spec.workers
    provider.set(spec.node_id, "running")
    controls: list[tuple[str, str]] = []

    async def on_control(msg):
        controls.append((msg.subject.split(".")[-2], schema.worker_control_decoder.decode(msg.data).action))

    for w in spec.workers:
        await nc.subscribe(subjects.worker_control(w), cb=on_control)
        await services.worker(config, "m", worker_id=w, node_id=spec.node_id)
    await demand(nc, subjects, "m", 0)
    client = await services.client()
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}'
    busy = asyncio.create_task(client.complete("m", "chat", body))  # 1.2 s on one worker
    await asyncio.sleep(0.9)  # the other idles past idle_s
    assert provider.stopped == [] and not busy.done()
    assert (await busy).finish_reasons
    await eventually(lambda: provider.stopped, timeout=10, what="the idle node's release")
    assert provider.stopped == [spec.node_id] and len(provider.requested) == 1
    await eventually(lambda: len(controls) == 2, what="a drain for each worker")
    assert sorted(controls) == [("a-n0", "drain"), ("a-n1", "drain")]


# --- the hot-node policy --------------------------------------------------------------------------


async def test_the_rotating_budget_goes_to_the_model_with_the_most_demand(services, nc, subjects):
    config = make_config(
        [{"id": m, "clusters": ["a"], "capacity": 1, "scaling": {"max_workers": 4}} for m in ("m", "n")]
        + [{"id": "hot", "clusters": ["a"], "scaling": {"min_hot": 1}}],
        scaler={"tick_s": 0.05, "rotating_nodes": 3},
    )
    provider = TableProvider()
    await scaler(services, config, {"a": provider})
    await demand(nc, subjects, "n", 1)
    await demand(nc, subjects, "m", 5)

    def started(model):
        return [s for s in provider.requested if s.model == model]

    await eventually(lambda: len(provider.requested) >= 4, what="the hot node and three rotating ones")
    await asyncio.sleep(0.3)
    assert len(started("hot")) == 1, "an always-hot model's node counts outside the budget"
    assert len(started("m")) + len(started("n")) == 3
    assert len(started("m")) >= 2, [s.model for s in provider.requested]


async def test_a_running_node_whose_workers_fell_silent_is_released_and_replaced(services, nc, subjects):
    """The engine died but its batch job did not: the node is released with its reason (instead
    of its slot counting as starting for ever) and, as demand remains, another one is started."""
    config = make_config([{"id": "m", "clusters": ["a"], "scaling": {"min_hot": 1}}], scaler={"tick_s": 0.05})
    seen = await node_events(nc, subjects)
    provider = TableProvider()
    await scaler(services, config, {"a": provider})
    [spec] = await eventually(lambda: provider.requested, what="the hot node")
    provider.set(spec.node_id, "running")
    worker = await services.worker(config, "m", worker_id=spec.workers[0], node_id=spec.node_id)
    await asyncio.sleep(0.3)
    assert provider.stopped == []
    await worker.stop()  # gone, while its job runs on
    [stopping] = await eventually(
        lambda: [e for e in seen if e.name == "stopping" and e.node_id == spec.node_id], what="the release"
    )
    assert stopping.reason == "its workers sent no heartbeat for 1.2 s"
    await eventually(lambda: len(provider.requested) == 2, what="a replacement")


async def test_a_provider_whose_poll_fails_is_reported_and_asked_again_only_after_a_back_off(
    services, nc, subjects
):
    config = make_config(
        [{"id": "m", "clusters": ["a"]}], scaler={"tick_s": 0.02, "backoff_s": 0.5, "backoff_max_s": 60}
    )
    seen = await node_events(nc, subjects)
    provider = TableProvider(fail_polls=True)
    await scaler(services, config, {"a": provider})
    await eventually(lambda: provider.polls, what="a poll")
    await asyncio.sleep(1.2)  # 60 ticks: polls after 0.5 s and 1 s of back-off at most
    assert 1 <= provider.polls <= 3
    reports = [e for e in seen if e.name == "failed" and e.cluster == "a"]
    assert len(reports) == provider.polls and "Unable to contact slurm controller" in reports[0].reason
