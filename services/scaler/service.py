"""The scaler service: every tick, compare each model's demand with its nodes and act through providers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from services.scaler.policy import ModelView, WorkerLoad, decide
from services.scaler.providers.base import NodeProvider, NodeSpec
from shared import clusterstate, natsauth, schema
from shared import config as cfg
from shared.book import DemandBook, WorkerBook
from shared.connect import unsubscribe
from shared.lifecycle import Lifecycle
from shared.subjects import Subjects
from shared.supervise import guarded

_MAX_BACKOFF_S = 60.0


@dataclass
class NodeRecord:
    spec: NodeSpec
    provider: NodeProvider
    state: schema.NodeState
    requested_at: float
    reason: str = ""


class Scaler(Lifecycle):
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        config: cfg.Config,
        providers: dict[str, NodeProvider],  # cluster name -> provider
    ):
        self.nc, self.subjects, self.config = nc, subjects, config
        self.settings = config.scaler
        self.providers = providers
        self.workers = WorkerBook(config.router.missed_heartbeats)
        self.demand = DemandBook(max_per_router=config.router.max_queue)
        self.nodes: dict[str, NodeRecord] = {}
        self._slot_cursor: dict[str, int] = {}  # cluster -> the slot index to try first
        self._failures: dict[str, int] = {}  # model -> failed starts in a row
        self._not_before: dict[str, float] = {}  # model -> no new start before this (backoff)
        self._subs: list = []
        self._task: asyncio.Task | None = None
        self.maintenance = clusterstate.MaintenanceFollower(nc, config)  # no new nodes there
        self._log = structlog.get_logger().bind(service="scaler")

    async def start(self) -> None:
        if self._task is not None:
            return
        self._subs += [
            await self.nc.subscribe(self.subjects.heartbeat_all, cb=self._on_heartbeat),
            await self.nc.subscribe(self.subjects.demand, cb=self._on_demand),
        ]
        self._task = asyncio.create_task(self._run(), name="scaler")
        await self.maintenance.start()
        self._log.info("scaler_started", clusters=list(self.providers))

    async def stop(self) -> None:
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.maintenance.stop()
        await unsubscribe(self._subs)
        for provider in set(self.providers.values()):
            await provider.close()
        await self._poll_providers()
        self._log.info("scaler_stopped")

    @guarded
    async def _on_heartbeat(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            beat = schema.heartbeat_decoder.decode(msg.data)
            self.workers.observe(beat)
            if beat.state == "ready":
                self._failures.pop(beat.model, None)

    @guarded
    async def _on_demand(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            self.demand.observe(schema.demand_decoder.decode(msg.data))

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                self._log.exception("scaler_tick_failed")
            await asyncio.sleep(self.settings.tick_s)

    async def tick(self) -> None:
        await self._poll_providers()
        await self._fail_slow_starts()
        for model in self.config.models:
            await self._scale(model)

    async def _poll_providers(self) -> None:
        for provider in set(self.providers.values()):
            for node_id, (state, reason) in (await provider.poll()).items():
                record = self.nodes.get(node_id)
                if record is None or record.state == state:
                    continue
                record.state, record.reason = state, reason or record.reason
                if state == "failed":
                    self._start_failed(record.spec.model)
                if state in ("failed", "stopped"):
                    del self.nodes[node_id]
                await self._event(record)

    async def _fail_slow_starts(self) -> None:
        """Release nodes whose worker never sent a heartbeat (a job stuck in a batch queue, say)."""
        now = time.monotonic()
        for record in list(self.nodes.values()):
            waiting = now - record.requested_at
            if (
                record.state in ("requested", "running")
                and self.workers.get(record.spec.node_id) is None
                and waiting > self.settings.start_timeout_s
            ):
                self._log.warning("node_start_timeout", node_id=record.spec.node_id, waited_s=round(waiting))
                record.state = "stopping"
                record.reason = f"no heartbeat within {self.settings.start_timeout_s:g} s"
                self._start_failed(record.spec.model)
                await record.provider.stop_node(record.spec.node_id)
                await self._event(record)

    def _start_failed(self, model: str) -> None:
        n = self._failures[model] = self._failures.get(model, 0) + 1
        self._not_before[model] = time.monotonic() + min(_MAX_BACKOFF_S, 2.0 ** (n - 1))

    def view(self, model: cfg.ModelConfig) -> ModelView:
        workers = self.workers.workers(model.id)
        ours = {r.spec.node_id for r in self.nodes.values()}
        seen = {e.worker_id for e in workers}
        pending = sum(
            1
            for r in self.nodes.values()
            if r.spec.model == model.id and r.state in ("requested", "running") and r.spec.node_id not in seen
        )
        return ModelView(
            queued=self.demand.queued(model.id, cluster=""),  # pinned requests: _scale_pinned
            workers=[
                WorkerLoad(
                    e.worker_id,
                    e.beat.node_id if e.beat.node_id in ours else "",
                    e.beat.state,
                    e.beat.in_flight,
                    e.beat.idle_s,
                )
                for e in workers
            ],
            pending_nodes=pending,
        )

    async def _scale(self, model: cfg.ModelConfig) -> None:
        decision = decide(model.scaling, model.capacity, self.view(model))
        for node_id in decision.stop:
            record = self.nodes[node_id]
            record.state = "stopping"
            self._log.info("node_release", node_id=node_id, model=model.id, reason="idle")
            await record.provider.stop_node(node_id)
            await self._event(record)
        if decision.start and time.monotonic() >= self._not_before.get(model.id, 0.0):
            for _ in range(decision.start):
                if not await self._start_node(model):
                    break
        await self._scale_pinned(model, decision.start)

    async def _scale_pinned(self, model: cfg.ModelConfig, started: int) -> None:
        """Requests pinned to a cluster wait for a worker there: start one in that cluster when
        the workers and nodes it has for the model cannot take them (within max_workers)."""
        pinned = self.demand.pinned(model.id)
        if not pinned or time.monotonic() < self._not_before.get(model.id, 0.0):
            return
        view = self.view(model)
        serving = [
            w for w in self.workers.workers(model.id) if w.beat.state in ("starting", "loading", "ready")
        ]
        room = model.scaling.max_workers - len(serving) - view.pending_nodes - started
        for cluster, queued in sorted(pinned.items()):
            here = [w for w in serving if w.beat.cluster == cluster]
            seen = {w.worker_id for w in here}
            pending = sum(
                1
                for r in self.nodes.values()
                if r.spec.model == model.id
                and r.spec.cluster == cluster
                and r.state in ("requested", "running")
                and r.spec.node_id not in seen
            )
            load = sum(w.in_flight for w in here) + queued
            wanted = -(-load // model.capacity) - len(here) - pending
            while wanted > 0 and room > 0:
                if not await self._start_node(model, cluster):
                    return
                wanted, room = wanted - 1, room - 1

    async def _start_node(self, model: cfg.ModelConfig, only: str = "") -> bool:
        cluster = self._pick_cluster(model, only)
        if cluster is None:
            return False
        node_id = self._free_slot(cluster)
        spec = NodeSpec(node_id=node_id, model=model.id, cluster=cluster)
        provider = self.providers[cluster]
        record = NodeRecord(spec, provider, "requested", time.monotonic())
        self.nodes[node_id] = record
        self._log.info(
            "node_request", node_id=node_id, model=model.id, cluster=cluster, provider=provider.name
        )
        try:
            await provider.start_node(spec)
        except Exception as exc:
            self._log.exception("node_request_failed", node_id=node_id)
            record.state, record.reason = "failed", str(exc)
            del self.nodes[node_id]
            self._start_failed(model.id)
            await self._event(record)
            return False
        await self._event(record)
        return True

    def _free_slot(self, cluster: str) -> str:
        """A node slot of the cluster that no node of ours holds: ``<cluster>-n<i>``, i below its
        max_nodes, taken in turn, so a replacement gets a fresh id while other slots are free.
        Slots are what NATS credentials are made for (shared/natsauth.py); a slot is free again
        only once its provider reports the node gone."""
        held = {r.spec.node_id for r in self.nodes.values()}
        size = self.config.cluster(cluster).max_nodes
        start = self._slot_cursor.get(cluster, 0)
        for i in (n % size for n in range(start, start + size)):
            if (slot := natsauth.worker_slot(cluster, i)) not in held:
                self._slot_cursor[cluster] = i + 1
                return slot
        raise RuntimeError(f"cluster {cluster} has no free node slot")  # _pick_cluster checked for room

    def _pick_cluster(self, model: cfg.ModelConfig, only: str = "") -> str | None:
        """The model's cluster that can start a node (a provider, room, not under maintenance):
        the one with the fewest nodes still waiting in its batch system, then the fewest of our
        nodes (``only``: that cluster, if it can)."""
        best, best_key = None, None
        for name in self.config.clusters_for(model):
            if (only and name != only) or self.maintenance.message(name) is not None:
                continue
            cluster = self.config.cluster(name)
            if cluster is None or name not in self.providers:
                continue
            ours = [r for r in self.nodes.values() if r.spec.cluster == name]
            key = (sum(r.state == "requested" for r in ours), len(ours))
            if len(ours) < cluster.max_nodes and (best_key is None or key < best_key):
                best, best_key = name, key
        return best

    async def _event(self, record: NodeRecord) -> None:
        event = schema.NodeEvent(
            node_id=record.spec.node_id,
            cluster=record.spec.cluster,
            model=record.spec.model,
            provider=record.provider.name,
            state=record.state,
            reason=record.reason,
            sent=time.time(),
        )
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(self.subjects.node_events, schema.encode(event))
