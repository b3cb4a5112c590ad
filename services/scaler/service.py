"""The scaler service: every tick, compare each model's demand with its nodes and act through providers.

One scaler acts at a time (shared/lease.py); others stand by, following heartbeats and
demand, and take over when the acting one dies. The node table lives in JetStream KV
(services/scaler/nodetable.py), so the one that takes over adopts the nodes already there.
This module decides how many nodes each model needs and in which cluster; fleet.py starts,
follows and releases them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import Counter

import msgspec
import structlog
from nats.aio.client import Client as NATS

from services.scaler.fleet import LIVE, WAITING, Fleet
from services.scaler.nodetable import NodeRecord
from services.scaler.policy import Decision, ModelView, WorkerLoad, decide, node_budget
from services.scaler.providers.base import NodeProvider
from shared import clusterstate, natsauth, schema
from shared import config as cfg
from shared.book import DemandBook, WorkerBook
from shared.connect import unsubscribe
from shared.discovery import Registration
from shared.events import EventPublisher
from shared.lease import Lease
from shared.lifecycle import Lifecycle
from shared.subjects import SCALER_SERVICE, Subjects
from shared.supervise import guarded


class Scaler(Lifecycle):
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        config: cfg.Config,
        providers: dict[str, NodeProvider],  # cluster name -> provider
        *,
        release_on_stop: bool = True,  # False: an orderly stop leaves the nodes to the next scaler
    ):
        self.nc, self.subjects, self.config = nc, subjects, config
        self.settings = config.scaler
        self.providers = providers
        self.release_on_stop = release_on_stop
        self.scaler_id = f"scaler-{uuid.uuid4().hex[:8]}"
        self.workers = WorkerBook(config.router.missed_heartbeats, keep_lost=True)
        self.demand = DemandBook(max_per_router=config.router.max_queue)
        self.lease: Lease | None = None
        self._in_charge = False  # holds the lease and has adopted the table
        self._subs: list = []
        self._task: asyncio.Task | None = None
        self.maintenance = clusterstate.MaintenanceFollower(nc, config)  # no new nodes there
        self.events = EventPublisher(nc, subjects, "scaler")
        self.discovery = Registration(
            nc, subjects, SCALER_SERVICE, description="FIRST scaler: starts and releases nodes for demand",
            counters=self._counters, metadata={"clusters": ",".join(providers)},
        )  # fmt: skip
        self._log = structlog.get_logger().bind(service="scaler", scaler_id=self.scaler_id)
        self.fleet = Fleet(nc, subjects, config, providers, self.workers, self.events, self._log)

    @property
    def nodes(self) -> dict[str, NodeRecord]:
        return self.fleet.nodes

    @property
    def acting(self) -> bool:
        """This scaler holds the lease and has adopted the node table: it acts."""
        return self._in_charge and self.lease is not None and self.lease.held

    async def start(self) -> None:
        if self._task is not None:
            return
        bucket = natsauth.scaler_bucket(self.config, self.subjects.prefix)
        table = await self.fleet.open(bucket)
        self.lease = Lease(table.kv, self.scaler_id, self.settings.lease_ttl_s)
        self._subs += [
            await self.nc.subscribe(self.subjects.heartbeat_all, cb=self._on_heartbeat),
            await self.nc.subscribe(self.subjects.demand, cb=self._on_demand),
        ]
        self._task = asyncio.create_task(self._run(), name="scaler")
        await self.maintenance.start()
        await self.discovery.start()
        self._log.info("scaler_started", clusters=list(self.providers))

    async def stop(self) -> None:
        if self._task is None:
            return
        task, self._task = self._task, None
        await self.discovery.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.maintenance.stop()
        await unsubscribe(self._subs)
        if self.acting and self.release_on_stop:
            await self.fleet.release_all()
        else:  # the nodes stay, in the table, for the scaler that comes next
            for provider in set(self.providers.values()):
                await provider.forget()
        await self.lease.hand_back()
        self._log.info("scaler_stopped", nodes_left=0 if self.release_on_stop else len(self.nodes))

    def _counters(self) -> dict:
        """For the service API's stats and status (shared/discovery.py)."""
        nodes: dict[str, int] = {}
        for record in self.nodes.values():
            nodes[record.state] = nodes.get(record.state, 0) + 1
        return {
            "nodes": nodes,
            "workers": len(self.workers.workers()),
            "clusters": list(self.providers),
            "acting": self.acting,
        }

    @guarded
    async def _on_heartbeat(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            beat = schema.heartbeat_decoder.decode(msg.data)
            self.workers.observe(beat)
            if beat.state == "ready":
                self.fleet.backoff.succeeded(beat.cluster)

    @guarded
    async def _on_demand(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            self.demand.observe(schema.demand_decoder.decode(msg.data))

    async def _run(self) -> None:
        while True:
            try:
                held = await self.lease.keep()
                if held and not self._in_charge:
                    await self._take_over()  # raises if the table cannot be read: tried again
                elif self._in_charge and not held:
                    await self._stand_down()
                if self._in_charge:
                    await self.tick()
                else:
                    self.workers.take_lost()  # the acting scaler reports them
            except Exception:
                self._log.exception("scaler_tick_failed")
            await asyncio.sleep(self.settings.tick_s)

    async def _take_over(self) -> None:
        adopted, dropped = await self.fleet.adopt()
        self._in_charge = True
        self._log.info("scaler_acting", adopted=adopted, dropped=dropped)

    async def _stand_down(self) -> None:
        """Another scaler acts now: stop tracking our nodes (they are in the table, its to adopt)."""
        await self.fleet.forget()
        self._in_charge = False
        self._log.warning("scaler_standing_by")

    async def tick(self) -> None:
        await self._report_lost_workers()
        await self.fleet.poll()
        await self.fleet.fail_slow_starts()
        await self._scale_all()

    def _expiring(self, beat: schema.Heartbeat) -> bool:
        """The worker drains soon for its node's walltime: count it out, so a replacement starts."""
        return bool(beat.drain_at) and time.time() >= beat.drain_at - self.settings.replace_ahead_s

    def view(self, model: cfg.ModelConfig) -> ModelView:
        workers = self.workers.workers(model.id)
        owners = self.fleet.owners()
        pending = self.fleet.pending_workers(model.id, {e.worker_id for e in workers})
        return ModelView(
            queued=self.demand.queued(model.id, cluster=""),  # pinned requests: _scale_pinned
            workers=[
                WorkerLoad(
                    e.worker_id,
                    owners.get(e.worker_id, ""),
                    "draining" if self._expiring(e.beat) else e.beat.state,
                    e.beat.in_flight,
                    e.beat.idle_s,
                )
                for e in workers
            ],
            pending_nodes=pending,
        )

    async def _scale_all(self) -> None:
        plans = []
        for model in self.config.models:
            view = self.view(model)
            plans.append((model, view, decide(model.scaling, model.capacity, view)))
        allowed = self._budget(plans)
        for model, view, decision in plans:
            await self._scale(model, view, decision, allowed.get(model.id))

    def _budget(self, plans: list[tuple[cfg.ModelConfig, ModelView, Decision]]) -> dict[str, int]:
        live = Counter(r.spec.model for r in self.nodes.values() if r.state in LIVE)
        return node_budget(plans, live, self.settings.rotating_nodes)

    async def _scale(
        self, model: cfg.ModelConfig, view: ModelView, decision: Decision, allowed: int | None
    ) -> None:
        await self._release_idle(model, decision)
        nodes = math.ceil(decision.start / model.scaling.workers_per_node)
        if allowed is not None:
            nodes = min(nodes, allowed)
        started = 0
        if nodes:
            in_flight = sum(w.in_flight for w in view.workers)
            await self.events.emit(
                "scale", "up", model=model.id, nodes=nodes, desired=decision.desired,
                reason=f"{view.queued} waiting and {in_flight} in flight: {decision.desired} workers wanted,"
                f" {len(view.workers)} up and {view.pending_nodes} starting",
            )  # fmt: skip
            for _ in range(nodes):
                if not await self._start_node(model):
                    break
                started += model.scaling.workers_per_node
        await self._scale_pinned(model, started)

    async def _release_idle(self, model: cfg.ModelConfig, decision: Decision) -> None:
        """Release the nodes all of whose workers the decision found idle (a node goes whole)."""
        idle = Counter(decision.stop)
        release = [
            self.nodes[n]
            for n, count in idle.items()
            if n in self.nodes and count >= len(self.nodes[n].spec.worker_ids)
        ]
        if not release:
            return
        await self.events.emit(
            "scale", "down", model=model.id, nodes=[r.spec.node_id for r in release], desired=decision.desired,
            reason=f"idle for {model.scaling.idle_s:g} s or more, {decision.desired} wanted",
        )  # fmt: skip
        for record in release:
            self._log.info("node_release", node_id=record.spec.node_id, model=model.id, reason="idle")
            await self.fleet.release(record, f"idle for {model.scaling.idle_s:g} s")

    async def _scale_pinned(self, model: cfg.ModelConfig, started: int) -> None:
        """Requests pinned to a cluster wait for a worker there: start one in that cluster when
        the workers and nodes it has for the model cannot take them (within max_workers)."""
        pinned = self.demand.pinned(model.id)
        if not pinned:
            return
        view = self.view(model)
        serving = [
            w for w in self.workers.workers(model.id) if w.beat.state in ("starting", "loading", "ready")
        ]
        room = model.scaling.max_workers - len(serving) - view.pending_nodes - started
        k = model.scaling.workers_per_node
        for cluster, queued in sorted(pinned.items()):
            here = [w for w in serving if w.beat.cluster == cluster]
            pending = self.fleet.pending_workers(model.id, {w.worker_id for w in here}, cluster)
            load = sum(w.in_flight for w in here) + queued
            wanted = -(-load // model.capacity) - len(here) - pending
            while wanted > 0 and room > 0:
                if not await self._start_node(model, cluster):
                    return
                wanted, room = wanted - k, room - k

    async def _start_node(self, model: cfg.ModelConfig, only: str = "") -> bool:
        cluster = self._pick_cluster(model, only)
        return cluster is not None and await self.fleet.start(model, cluster)

    def _pick_cluster(self, model: cfg.ModelConfig, only: str = "") -> str | None:
        """The model's cluster that can start a node (a provider, free worker slots, not under
        maintenance, not backing off): the one with the fewest nodes still waiting in its batch
        system, then the fewest of our nodes (``only``: that cluster, if it can)."""
        best, best_key = None, None
        k = model.scaling.workers_per_node
        for name in self.config.clusters_for(model):
            if (only and name != only) or self.maintenance.message(name) is not None:
                continue
            cluster = self.config.cluster(name)
            if cluster is None or name not in self.providers or self.fleet.backoff.waiting(name):
                continue
            ours = [r for r in self.nodes.values() if r.spec.cluster == name]
            slots = sum(len(r.spec.worker_ids) for r in ours)
            key = (sum(r.state in WAITING for r in ours), len(ours))
            if slots + k <= cluster.max_nodes and (best_key is None or key < best_key):
                best, best_key = name, key
        return best

    async def _report_lost_workers(self) -> None:
        """``worker.lost`` for each worker whose heartbeats stopped (one scaler reports it, not every
        router)."""
        for entry in self.workers.take_lost():
            beat = entry.beat
            silent = time.monotonic() - entry.last_seen
            await self.events.emit(
                "worker", "lost", cluster=beat.cluster, model=beat.model, worker_id=beat.worker_id,
                node_id=beat.node_id, reason=f"no heartbeat for {silent:.0f} s", state=beat.state,
            )  # fmt: skip
