"""The scaler with a provider whose nodes arrive late or never, as batch systems' nodes do.

``BatchQueueProvider`` is a thin double for Slurm/PBS, which cannot run here: a node stays
``requested`` (a pending job) until the test lets it start, and then a real worker comes up under
the node's id. Scaler, router, worker and NATS are real.
"""

from __future__ import annotations

import asyncio

import orjson

from services.scaler.providers.base import NodeProvider, NodeSpec
from services.scaler.service import Scaler
from shared import events as shared_events
from shared import schema
from tests.integration.conftest import make_config
from tests.support import eventually


class BatchQueueProvider(NodeProvider):
    name = "batch"

    def __init__(self):
        self.requested: list[NodeSpec] = []
        self.states: dict[str, schema.NodeState] = {}
        self.stopped: list[str] = []

    async def start_node(self, spec: NodeSpec) -> None:
        self.requested.append(spec)
        self.states[spec.node_id] = "requested"

    async def stop_node(self, node_id: str) -> None:
        self.stopped.append(node_id)
        self.states[node_id] = "stopped"

    async def poll(self) -> dict[str, tuple[schema.NodeState, str]]:
        return {node_id: (state, "") for node_id, state in self.states.items()}

    async def close(self) -> None:
        pass


async def start_scaler(services, config, provider) -> Scaler:
    scaler = Scaler(await services.connect(), services.subjects, config, {"a": provider})
    await services.stack.enter_async_context(scaler)
    return scaler


def chat() -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


async def test_a_late_node_is_waited_for_and_not_asked_for_twice(services):
    config = make_config(
        [{"id": "m", "clusters": ["a"], "scaling": {"max_workers": 3}}], scaler={"tick_s": 0.05}
    )
    await services.router(config)
    provider = BatchQueueProvider()
    await start_scaler(services, config, provider)
    client = await services.client()
    requests = [asyncio.create_task(client.complete("m", "chat", chat())) for _ in range(3)]
    await eventually(lambda: provider.requested, what="a node request")
    await asyncio.sleep(0.5)  # ten scaler ticks while the job waits in the batch queue
    assert len(provider.requested) == 1, "demand that a pending node will meet asked for another"
    assert not any(r.done() for r in requests)

    node = provider.requested[0]
    provider.states[node.node_id] = "running"  # the job starts; its worker comes up
    await services.worker(config, "m", worker_id=node.workers[0], node_id=node.node_id)
    results = await asyncio.wait_for(asyncio.gather(*requests), 10)
    assert [r.worker_id for r in results] == [node.workers[0]] * 3


async def test_a_node_that_never_reports_is_released_and_tried_again(services, nc, subjects):
    config = make_config([{"id": "m", "clusters": ["a"]}], scaler={"tick_s": 0.05, "start_timeout_s": 0.3})
    await services.router(config)
    events: list[schema.Event] = []

    async def on_event(msg):
        events.append(shared_events.decode(msg.data))

    await nc.subscribe(subjects.node_events, cb=on_event)
    provider = BatchQueueProvider()
    await start_scaler(services, config, provider)
    client = await services.client()
    pending = asyncio.create_task(client.complete("m", "chat", chat()))

    await eventually(lambda: provider.stopped, what="the silent node to be released")
    first = provider.requested[0].node_id
    assert provider.stopped == [first]

    def released():
        return next((e for e in events if e.node_id == first and e.name == "stopping"), None)

    assert "no heartbeat within 0.3 s" in (await eventually(released, what="the stopping event")).reason
    await eventually(lambda: len(provider.requested) == 2, what="a second try after the back-off")
    pending.cancel()


async def test_nodes_start_where_none_wait_in_the_batch_queue_and_never_under_maintenance(services, nc):
    """Three requests need three nodes (capacity 1): the second goes to the cluster with no pending
    job, the third back to the first; with 'b' under maintenance, every node starts on 'a'."""
    from shared import clusterstate

    config = make_config(
        [{"id": m, "capacity": 1, "scaling": {"max_workers": 3}} for m in ("m", "n")],
        nats={"subject_prefix": services.subjects.prefix},
        clusters=[{"name": "a", "max_nodes": 6}, {"name": "b", "max_nodes": 6}],
        scaler={"tick_s": 0.05},
    )
    await services.router(config)
    a, b = BatchQueueProvider(), BatchQueueProvider()
    scaler = Scaler(await services.connect(), services.subjects, config, {"a": a, "b": b})
    await services.stack.enter_async_context(scaler)
    client = await services.client(request_timeout_s=30)

    def clusters(model: str) -> list[str]:
        return [c for c, p in (("a", a), ("b", b)) for spec in p.requested if spec.model == model]

    waiting = [asyncio.create_task(client.complete("m", "chat", chat())) for _ in range(3)]
    await eventually(lambda: len(clusters("m")) == 3, what="three node requests")
    assert sorted(clusters("m")) == ["a", "a", "b"]

    kv = await clusterstate.open_bucket(nc.jetstream(), clusterstate.bucket_name(config), create=True)
    await clusterstate.set_maintenance(kv, "b", "upgrade")
    await eventually(
        lambda: scaler.maintenance.message("b") is not None, what="the scaler to see b's maintenance"
    )
    waiting += [asyncio.create_task(client.complete("n", "chat", chat())) for _ in range(3)]
    await eventually(lambda: len(clusters("n")) == 3, what="three nodes for n")
    assert clusters("n") == ["a", "a", "a"]
    for task in waiting:
        task.cancel()
