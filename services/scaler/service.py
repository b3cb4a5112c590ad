"""The scaler service: every tick, compare each model's demand with its nodes and act through providers.

One scaler acts at a time (shared/lease.py); others stand by, following heartbeats and
demand, and take over when the acting one dies. The node table lives in JetStream KV
(services/scaler/nodetable.py), so the one that takes over adopts the nodes already there.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import Counter

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from services.scaler.nodetable import NodeRecord, NodeTable, record_of
from services.scaler.placement import ClusterBackoff, SlotCursor
from services.scaler.policy import Decision, ModelView, WorkerLoad, decide, node_budget
from services.scaler.providers.base import NodeProvider, NodeSpec
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

_WAITING = ("requested", "queued")  # asked for, not running yet
_LIVE = ("requested", "queued", "running")  # not on its way out


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
        self.nodes: dict[str, NodeRecord] = {}
        self.table: NodeTable | None = None
        self.lease: Lease | None = None
        self._in_charge = False  # holds the lease and has adopted the table
        self._slots = SlotCursor()
        self.backoff = ClusterBackoff(self.settings.backoff_s, self.settings.backoff_max_s)
        # A provider whose poll fails is asked again only after a back-off of its own.
        self._poll_backoff = ClusterBackoff(self.settings.backoff_s, self.settings.backoff_max_s)
        self._subs: list = []
        self._task: asyncio.Task | None = None
        self.maintenance = clusterstate.MaintenanceFollower(nc, config)  # no new nodes there
        self.events = EventPublisher(nc, subjects, "scaler")
        self.discovery = Registration(
            nc, subjects, SCALER_SERVICE, description="FIRST scaler: starts and releases nodes for demand",
            counters=self._counters, metadata={"clusters": ",".join(providers)},
        )  # fmt: skip
        self._log = structlog.get_logger().bind(service="scaler", scaler_id=self.scaler_id)

    @property
    def acting(self) -> bool:
        """This scaler holds the lease and has adopted the node table: it acts."""
        return self._in_charge and self.lease is not None and self.lease.held

    async def start(self) -> None:
        if self._task is not None:
            return
        bucket = natsauth.scaler_bucket(self.config, self.subjects.prefix)
        self.table = await NodeTable.open(self.nc.jetstream(), bucket)
        self.lease = Lease(self.table.kv, self.scaler_id, self.settings.lease_ttl_s)
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
            for record in self.nodes.values():
                await self._drain_workers(record, "the stack is stopping")
            for provider in set(self.providers.values()):
                await provider.close()
            await self._poll_providers()
            for node_id in list(self.nodes):
                await self.table.remove(node_id)
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
                self.backoff.succeeded(beat.cluster)

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
        """Adopt the nodes in the table: those a provider here can track again are ours; the others'
        workers are asked to drain, and their entries go."""
        adopted, dropped = [], []
        for entry in await self.table.load():
            if entry.node_id in self.nodes:
                continue
            provider = self.providers.get(entry.cluster)
            record = record_of(entry, provider)
            ok = False
            if provider is not None and entry.state not in ("failed", "stopped"):
                try:
                    ok = await provider.adopt(record.spec, entry.job_id)
                except Exception:
                    self._log.exception("node_adopt_failed", node_id=entry.node_id)
            if not ok:
                dropped.append(entry.node_id)
                await self._drain_workers(record, "its scaler restarted and cannot track it")
                await self.table.remove(entry.node_id)
                continue
            if entry.state == "running":  # its workers get a grace to be heard by this scaler
                record.heard, record.last_heard = True, time.monotonic()
            self.nodes[entry.node_id] = record
            adopted.append(entry.node_id)
            if record.state == "stopping":  # it was being released: carry on
                await self._release(record, record.reason or "released by the scaler before")
        self._in_charge = True
        self._log.info("scaler_acting", adopted=adopted, dropped=dropped)

    async def _stand_down(self) -> None:
        """Another scaler acts now: stop tracking our nodes (they are in the table, its to adopt)."""
        for provider in set(self.providers.values()):
            await provider.forget()
        self.nodes.clear()
        self._in_charge = False
        self._log.warning("scaler_standing_by")

    async def tick(self) -> None:
        await self._report_lost_workers()
        await self._poll_providers()
        await self._fail_slow_starts()
        await self._scale_all()

    async def _poll_providers(self) -> None:
        for cluster, provider in self.providers.items():
            if provider in [self.providers[c] for c in self.providers if c < cluster]:
                continue  # one provider serving several clusters: polled once
            if self._poll_backoff.waiting(cluster):
                continue
            try:
                states = await provider.poll()
                details = provider.details()
            except Exception as exc:
                self._poll_backoff.failed(cluster)
                await self._provider_failed(cluster, provider, f"poll failed: {exc!r}")
                continue
            self._poll_backoff.succeeded(cluster)
            for node_id, (state, reason) in states.items():
                record = self.nodes.get(node_id)
                if record is None:
                    continue
                changed = record.state != state
                if changed:  # a new state's reason; a release's stays with its end
                    record.reason = reason or (record.reason if state in ("stopped", "failed") else "")
                elif reason:
                    record.reason = reason
                record.state = state
                if state == "failed":
                    self.backoff.failed(record.spec.cluster)
                if changed:
                    await self._event(record)
                if state in ("failed", "stopped"):
                    del self.nodes[node_id]
                    await self.table.remove(node_id)
            for record in self.nodes.values():
                if record.provider is provider:
                    record.details = details.get(record.spec.node_id, record.details)
                    await self.table.save(record)

    async def _provider_failed(self, cluster: str, provider: NodeProvider, why: str) -> None:
        """A provider that fails is reported and its cluster backs off, not retried every tick."""
        wait = self.backoff.failed(cluster)
        self._log.warning(
            "provider_failed", cluster=cluster, provider=provider.name, error=why[:500], retry_s=wait
        )
        await self.events.emit(
            "node", "failed", cluster=cluster, reason=f"provider {provider.name}: {why}"[:4000],
            provider=provider.name, retry_s=round(wait, 1),
        )  # fmt: skip

    async def _fail_slow_starts(self) -> None:
        """Release nodes none of whose workers ever sent a heartbeat (a job stuck in a batch queue),
        and running nodes whose workers have all gone silent (an engine that died in a job that
        did not): both hold worker slots that would otherwise count as starting for ever."""
        now = time.monotonic()
        silent_s = 2 * self.config.router.missed_heartbeats * self.config.worker.heartbeat_s
        for record in list(self.nodes.values()):
            if any(self.workers.get(w) for w in record.spec.worker_ids):
                record.heard, record.last_heard = True, now
            elif record.state == "running" and record.heard and now - record.last_heard > silent_s:
                self.backoff.failed(record.spec.cluster)
                await self._release(record, f"its workers sent no heartbeat for {silent_s:g} s")
                continue
            waiting = now - record.requested_at
            if record.state in _LIVE and not record.heard and waiting > self.settings.start_timeout_s:
                self._log.warning("node_start_timeout", node_id=record.spec.node_id, waited_s=round(waiting))
                why = f"no heartbeat within {self.settings.start_timeout_s:g} s"
                if record.reason:
                    why += f" ({record.state}: {record.reason})"
                self.backoff.failed(record.spec.cluster)
                await self._release(record, why)

    def _owners(self) -> dict[str, str]:
        """Worker id -> the node of ours it runs on."""
        return {w: r.spec.node_id for r in self.nodes.values() for w in r.spec.worker_ids}

    def _expiring(self, beat: schema.Heartbeat) -> bool:
        """The worker drains soon for its node's walltime: count it out, so a replacement starts."""
        return bool(beat.drain_at) and time.time() >= beat.drain_at - self.settings.replace_ahead_s

    def view(self, model: cfg.ModelConfig) -> ModelView:
        workers = self.workers.workers(model.id)
        owners = self._owners()
        seen = {e.worker_id for e in workers}
        pending = sum(
            1
            for r in self.nodes.values()
            if r.spec.model == model.id and r.state in _LIVE
            for w in r.spec.worker_ids
            if w not in seen
        )
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
        live = Counter(r.spec.model for r in self.nodes.values() if r.state in _LIVE)
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
            await self._release(record, f"idle for {model.scaling.idle_s:g} s")

    async def _release(self, record: NodeRecord, reason: str) -> None:
        """Ask the node's workers to drain (over NATS: any provider), then its provider to end it."""
        record.state, record.reason = "stopping", reason
        await self._drain_workers(record, reason)
        if record.provider is not None:
            try:
                await record.provider.stop_node(record.spec.node_id)
            except Exception as exc:
                await self._provider_failed(record.spec.cluster, record.provider, f"stop failed: {exc!r}")
        await self._event(record)
        await self.table.save(record)

    async def _drain_workers(self, record: NodeRecord, reason: str) -> None:
        control = schema.encode(schema.WorkerControl(action="drain", reason=reason[:4096], sent=time.time()))
        for worker_id in record.spec.worker_ids:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(self.subjects.worker_control(worker_id), control)

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
            seen = {w.worker_id for w in here}
            pending = sum(
                1
                for r in self.nodes.values()
                if r.spec.model == model.id and r.spec.cluster == cluster and r.state in _LIVE
                for w in r.spec.worker_ids
                if w not in seen
            )
            load = sum(w.in_flight for w in here) + queued
            wanted = -(-load // model.capacity) - len(here) - pending
            while wanted > 0 and room > 0:
                if not await self._start_node(model, cluster):
                    return
                wanted, room = wanted - k, room - k

    async def _start_node(self, model: cfg.ModelConfig, only: str = "") -> bool:
        k = model.scaling.workers_per_node
        cluster = self._pick_cluster(model, only)
        if cluster is None:
            return False
        held = set(self._owners()) | {e.worker_id for e in self.workers.workers()}
        slots = self._slots.take(cluster, self.config.cluster(cluster).max_nodes, held, k)
        if slots is None:
            return False
        spec = NodeSpec(
            node_id=f"{cluster}-{uuid.uuid4().hex[:8]}",
            model=model.id,
            cluster=cluster,
            workers=tuple(slots),
            walltime_s=self.config.cluster(cluster).walltime_s,
        )
        provider = self.providers[cluster]
        record = NodeRecord(spec, provider, "requested", time.monotonic())
        self.nodes[spec.node_id] = record
        self._log.info(
            "node_request", node_id=spec.node_id, workers=slots, model=model.id, cluster=cluster,
            provider=provider.name,
        )  # fmt: skip
        await self.table.save(record)  # before the job exists: a successor then knows of it
        try:
            await provider.start_node(spec)
        except Exception as exc:
            self._log.exception("node_request_failed", node_id=spec.node_id)
            record.state, record.reason = "failed", f"submission failed: {exc}"
            del self.nodes[spec.node_id]
            await self.table.remove(spec.node_id)
            await self._event(record)
            await self._provider_failed(cluster, provider, f"start failed: {exc!r}")
            return False
        with contextlib.suppress(Exception):  # shown at the next poll, which reports a failure
            record.details = provider.details().get(spec.node_id, {})
        await self.table.save(record)
        await self._event(record)
        return True

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
            if cluster is None or name not in self.providers or self.backoff.waiting(name):
                continue
            ours = [r for r in self.nodes.values() if r.spec.cluster == name]
            slots = sum(len(r.spec.worker_ids) for r in ours)
            key = (sum(r.state in _WAITING for r in ours), len(ours))
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

    async def _event(self, record: NodeRecord) -> None:
        """A node event for operators and routers: ``node.<requested|queued|running|failed|stopping|
        released>``, with the provider's reason."""
        name = "released" if record.state == "stopped" else record.state
        await self.events.emit(
            "node", name, cluster=record.spec.cluster, model=record.spec.model,
            node_id=record.spec.node_id, reason=record.reason, provider=record.provider_name,
            workers=list(record.spec.worker_ids), job_id=str(record.details.get("job_id", "")),
        )  # fmt: skip
