"""The nodes this scaler asked for, from request to release.

``Fleet`` starts a node through its cluster's provider, follows it through the provider's polls and
its workers' heartbeats, releases it (drain its workers over NATS, then end the job), and adopts
the nodes in the table when this scaler takes over. Every change is written to the node table
(nodetable.py) and sent as a node event. How many nodes, and where, the scaler decides
(service.py); this module carries it out.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import nats.errors
from nats.aio.client import Client as NATS

from services.scaler.nodetable import NodeRecord, NodeTable, record_of
from services.scaler.placement import ClusterBackoff, SlotCursor
from services.scaler.providers.base import NodeProvider, NodeSpec
from shared import config as cfg
from shared import schema
from shared.book import WorkerBook
from shared.events import EventPublisher
from shared.subjects import Subjects

WAITING = ("requested", "queued")  # asked for, not running yet
LIVE = ("requested", "queued", "running")  # not on its way out


class Fleet:
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        config: cfg.Config,
        providers: dict[str, NodeProvider],  # cluster name -> provider
        workers: WorkerBook,
        events: EventPublisher,
        log,
    ):
        self.nc, self.subjects, self.config = nc, subjects, config
        self.settings = config.scaler
        self.providers, self.workers, self.events = providers, workers, events
        self.nodes: dict[str, NodeRecord] = {}
        self.table: NodeTable | None = None
        self._slots = SlotCursor()
        self.backoff = ClusterBackoff(self.settings.backoff_s, self.settings.backoff_max_s)
        # A provider whose poll fails is asked again only after a back-off of its own.
        self._poll_backoff = ClusterBackoff(self.settings.backoff_s, self.settings.backoff_max_s)
        self._log = log

    async def open(self, bucket: str) -> NodeTable:
        self.table = await NodeTable.open(self.nc.jetstream(), bucket, self.config.nats.jetstream_replicas)
        return self.table

    def owners(self) -> dict[str, str]:
        """Worker id -> the node of ours it runs on."""
        return {w: r.spec.node_id for r in self.nodes.values() for w in r.spec.worker_ids}

    def pending_workers(self, model: str, seen: set[str], cluster: str = "") -> int:
        """Workers of our live nodes of ``model`` (in ``cluster``, where given) not yet heard from."""
        return sum(
            1
            for r in self.nodes.values()
            if r.spec.model == model and r.state in LIVE and (not cluster or r.spec.cluster == cluster)
            for w in r.spec.worker_ids
            if w not in seen
        )

    # --- taking over and handing on ----------------------------------------------------------

    async def adopt(self) -> tuple[list[str], list[str]]:
        """Adopt the nodes in the table: those a provider here can track again are ours; the others'
        workers are asked to drain, and their entries go. Returns (adopted, dropped)."""
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
                await self.drain_workers(record, "its scaler restarted and cannot track it")
                await self.table.remove(entry.node_id)
                continue
            if entry.state == "running":  # its workers get a grace to be heard by this scaler
                record.heard, record.last_heard = True, time.monotonic()
            self.nodes[entry.node_id] = record
            adopted.append(entry.node_id)
            if record.state == "stopping":  # it was being released: carry on
                await self.release(record, record.reason or "released by the scaler before")
        return adopted, dropped

    async def forget(self) -> None:
        """Stop tracking our nodes; they stay in the table for whichever scaler acts next."""
        for provider in set(self.providers.values()):
            await provider.forget()
        self.nodes.clear()

    async def release_all(self) -> None:
        """The stack is stopping: drain every worker, end every job, empty the table."""
        for record in self.nodes.values():
            await self.drain_workers(record, "the stack is stopping")
        for provider in set(self.providers.values()):
            await provider.close()
        await self.poll()
        for node_id in list(self.nodes):
            await self.table.remove(node_id)

    # --- following the nodes -----------------------------------------------------------------

    async def poll(self) -> None:
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
                await self.provider_failed(cluster, provider, f"poll failed: {exc!r}")
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

    async def provider_failed(self, cluster: str, provider: NodeProvider, why: str) -> None:
        """A provider that fails is reported and its cluster backs off, not retried every tick."""
        wait = self.backoff.failed(cluster)
        self._log.warning(
            "provider_failed", cluster=cluster, provider=provider.name, error=why[:500], retry_s=wait
        )
        await self.events.emit(
            "node", "failed", cluster=cluster, reason=f"provider {provider.name}: {why}"[:4000],
            provider=provider.name, retry_s=round(wait, 1),
        )  # fmt: skip

    async def fail_slow_starts(self) -> None:
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
                await self.release(record, f"its workers sent no heartbeat for {silent_s:g} s")
                continue
            waiting = now - record.requested_at
            if record.state in LIVE and not record.heard and waiting > self.settings.start_timeout_s:
                self._log.warning("node_start_timeout", node_id=record.spec.node_id, waited_s=round(waiting))
                why = f"no heartbeat within {self.settings.start_timeout_s:g} s"
                if record.reason:
                    why += f" ({record.state}: {record.reason})"
                self.backoff.failed(record.spec.cluster)
                await self.release(record, why)

    # --- starting and releasing --------------------------------------------------------------

    async def start(self, model: cfg.ModelConfig, cluster: str) -> bool:
        """Ask ``cluster``'s provider for a node of ``model``; False when it has no free worker
        slots or the submission failed."""
        k = model.scaling.workers_per_node
        held = set(self.owners()) | {e.worker_id for e in self.workers.workers()}
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
            await self.provider_failed(cluster, provider, f"start failed: {exc!r}")
            return False
        with contextlib.suppress(Exception):  # shown at the next poll, which reports a failure
            record.details = provider.details().get(spec.node_id, {})
        await self.table.save(record)
        await self._event(record)
        return True

    async def release(self, record: NodeRecord, reason: str) -> None:
        """Ask the node's workers to drain (over NATS: any provider), then its provider to end it."""
        record.state, record.reason = "stopping", reason
        await self.drain_workers(record, reason)
        if record.provider is not None:
            try:
                await record.provider.stop_node(record.spec.node_id)
            except Exception as exc:
                await self.provider_failed(record.spec.cluster, record.provider, f"stop failed: {exc!r}")
        await self._event(record)
        await self.table.save(record)

    async def drain_workers(self, record: NodeRecord, reason: str) -> None:
        control = schema.encode(schema.WorkerControl(action="drain", reason=reason[:4096], sent=time.time()))
        for worker_id in record.spec.worker_ids:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(self.subjects.worker_control(worker_id), control)

    async def _event(self, record: NodeRecord) -> None:
        """A node event for operators and routers: ``node.<requested|queued|running|failed|stopping|
        released>``, with the provider's reason."""
        name = "released" if record.state == "stopped" else record.state
        await self.events.emit(
            "node", name, cluster=record.spec.cluster, model=record.spec.model,
            node_id=record.spec.node_id, reason=record.reason, provider=record.provider_name,
            workers=list(record.spec.worker_ids), job_id=str(record.details.get("job_id", "")),
        )  # fmt: skip
