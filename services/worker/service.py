"""The worker service: heartbeats, admission of dispatched requests, cancel and drain.

Serving one request is services/worker/run.py. A worker never holds more runs than its capacity:
routers' counts may lag (several routers, a heartbeat in flight), so the worker refuses what it
cannot take and the router tries elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from services.worker.engines.base import Engine
from services.worker.run import Runner
from shared import config as cfg
from shared import schema
from shared.book import RecentIds
from shared.cancels import Cancels, native_user
from shared.connect import unsubscribe
from shared.discovery import Registration
from shared.events import EventPublisher
from shared.lifecycle import Lifecycle
from shared.subjects import WORKER_SERVICE, Subjects
from shared.supervise import Throttle, guarded


def default_worker_id(cluster: str, model_id: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", model_id.rsplit("/", 1)[-1]).strip("-").lower()[:40]
    return f"{cluster}-{slug}-{uuid.uuid4().hex[:8]}"


class Worker(Lifecycle):
    """One engine's worth of serving. ``start`` loads the engine; ``drain`` finishes what it has."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        settings: cfg.WorkerConfig,
        model: cfg.ModelConfig,
        cluster: str,
        engine: Engine,
        *,
        worker_id: str = "",
        node_id: str = "",
        drain_at: float = 0.0,
    ):
        self.nc, self.subjects, self.settings = nc, subjects, settings
        self.model, self.cluster, self.engine = model, cluster, engine
        self.worker_id = worker_id or default_worker_id(cluster, model.id)
        self.node_id = node_id
        self.drain_at = drain_at  # unix s it drains at for its node's walltime (0: none)
        self.state: schema.WorkerState = "starting"
        self._tasks: dict[str, asyncio.Task] = {}  # run key (request id:attempt) -> its task
        self._owners: dict[str, str] = {}  # run key -> its NATS-native caller, if it has one
        self._cancelled = Cancels()
        self._ran = RecentIds(ttl_s=30.0)  # run keys taken lately: a second dispatch is a duplicate
        self._runner = Runner(
            nc,
            subjects,
            engine,
            worker_id=self.worker_id,
            cluster=cluster,
            pack_interval_s=settings.pack_interval_ms / 1000,
            stopping=lambda: self.state == "stopped",
        )
        self._subs: list = []
        self._cancel_subject = subjects.worker_cancel(self.worker_id)
        self._infer_sub = None
        self._beat_now = asyncio.Event()
        self._heartbeat_task: asyncio.Task | None = None
        self._had_runs = False  # the last RunsBeat listed some: send one more, even if empty
        self._last_done = time.monotonic()
        self._started = False
        self._throttle = Throttle()
        self._log = structlog.get_logger().bind(worker_id=self.worker_id, model=model.id)
        self._events = EventPublisher(nc, subjects, self.worker_id)
        self.served = 0  # runs that ended, however
        self.discovery = Registration(
            nc, subjects, WORKER_SERVICE, description="FIRST worker: one engine's worth of serving",
            counters=self._counters, instance=self.worker_id,
            metadata={"worker_id": self.worker_id, "cluster": cluster, "model": model.id, "node_id": node_id},
        )  # fmt: skip

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.discovery.start()  # listed while its engine loads, too
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="worker-heartbeats")
        self._subs += [
            await self.nc.subscribe(self._cancel_subject, cb=self._on_cancel),
            await self.nc.subscribe(self.subjects.worker_cancel_users(self.worker_id), cb=self._on_cancel),
        ]
        self._set_state("loading")
        await self._event("starting", engine=self.engine.name)
        loading = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.engine_start_timeout_s):
                await self.engine.start()
        except asyncio.CancelledError:  # asked to stop while loading
            await self.stop()
            raise
        except BaseException:
            self._log.exception("engine_start_failed")
            await self.stop()
            raise
        self._infer_sub = await self.nc.subscribe(
            self.subjects.worker_infer(self.worker_id), cb=self._on_dispatch
        )
        self._set_state("ready")
        self._log.info("worker_ready", cluster=self.cluster, engine=self.engine.name)
        await self._event("ready", engine=self.engine.name, load_s=round(time.monotonic() - loading, 3))

    async def _event(self, name: str, reason: str = "", **data) -> None:
        await self._events.emit(
            "worker", name, cluster=self.cluster, model=self.model.id, worker_id=self.worker_id,
            node_id=self.node_id, reason=reason, **data,
        )  # fmt: skip

    async def drain(self) -> None:
        """Take no new requests, finish the ones in flight (up to drain_timeout_s), then stop."""
        if self.state in ("draining", "stopped"):
            return
        self._set_state("draining")
        await self._event("draining", in_flight=self.in_flight)
        await self._unsubscribe_infer()
        if self._tasks:
            self._log.info("worker_draining", in_flight=self.in_flight)
            _, pending = await asyncio.wait(list(self._tasks.values()), timeout=self.settings.drain_timeout_s)
            if pending:
                self._log.warning("drain_timeout", abandoned=len(pending))
        await self.stop()

    async def stop(self) -> None:
        """Stop now: runs that have not begun their answer go back to their callers (Retry), the
        others end with an error."""
        if self.state == "stopped":
            return
        self.state = "stopped"
        await self.discovery.stop()
        await self._unsubscribe_infer()
        await unsubscribe(self._subs)
        for task in list(self._tasks.values()):
            task.cancel("worker stopped")
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        with contextlib.suppress(nats.errors.Error):
            await self._publish_heartbeat()  # "stopped": routers forget this worker at once
        await self.engine.stop()
        await self._event("stopped")
        self._log.info("worker_stopped")

    async def _unsubscribe_infer(self) -> None:
        sub, self._infer_sub = self._infer_sub, None
        await unsubscribe([sub] if sub else [])

    def _counters(self) -> dict:
        """For the service API's stats and status (shared/discovery.py)."""
        return {"state": self.state, "in_flight": self.in_flight, "capacity": self.model.capacity,
                "served": self.served}  # fmt: skip

    # --- heartbeats ----------------------------------------------------------------------------

    def _set_state(self, state: schema.WorkerState) -> None:
        self.state = state
        self._beat_now.set()

    async def _heartbeats(self) -> None:
        """Beat every heartbeat_s, and at once when something routers should know changes. Nothing
        that goes wrong here (NATS trouble, an engine's garbage metrics) stops the beats."""
        next_runs = 0.0
        while True:
            try:
                await self._publish_heartbeat()
                if time.monotonic() >= next_runs:
                    next_runs = time.monotonic() + self.settings.heartbeat_s
                    await self._publish_runs()
            except nats.errors.Error as exc:
                if self._throttle("heartbeat-nats"):
                    self._log.warning("heartbeat_failed", error=repr(exc))
            except Exception:
                if self._throttle("heartbeat"):
                    self._log.exception("heartbeat_failed")
            wait = min(self.settings.heartbeat_s, max(0.0, next_runs - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._beat_now.wait()
            self._beat_now.clear()

    async def _engine_load(self) -> schema.EngineLoad:
        if self.state != "ready":
            return schema.EngineLoad()
        try:
            async with asyncio.timeout(max(0.1, self.settings.heartbeat_s / 2)):
                return await self.engine.load()
        except Exception:
            if self._throttle("engine-load"):
                self._log.exception("engine_load_failed")
            return schema.EngineLoad()

    async def _publish_heartbeat(self) -> None:
        idle = 0.0 if self._tasks else time.monotonic() - self._last_done
        beat = schema.Heartbeat(
            worker_id=self.worker_id,
            cluster=self.cluster,
            model=self.model.id,
            state=self.state,
            capacity=self.model.capacity,
            in_flight=self.in_flight,
            interval_s=self.settings.heartbeat_s,
            idle_s=round(idle, 3),
            engine=await self._engine_load(),
            node_id=self.node_id,
            sent=time.time(),
            framework=self.model.framework,
            drain_at=self.drain_at,
        )
        await self.nc.publish(self.subjects.heartbeat(self.cluster, self.worker_id), schema.encode(beat))

    async def _publish_runs(self) -> None:
        """What this worker runs, for the callers waiting on it (every interval, not on every event)."""
        if self._tasks or self._had_runs:
            self._had_runs = bool(self._tasks)
            runs = schema.RunsBeat(self.worker_id, self.settings.heartbeat_s, list(self._tasks), time.time())
            await self.nc.publish(self.subjects.worker_runs(self.worker_id), schema.encode(runs))

    # --- requests ------------------------------------------------------------------------------

    @guarded
    async def _on_dispatch(self, msg) -> None:
        try:
            request = schema.infer_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            await self._answer(msg, False, f"undecodable request: {str(exc)[:300]}")
            return
        key = schema.run_key(request.request_id, request.attempt)
        if self._cancelled.stops(request):
            reason = schema.CANCELLED
        elif key in self._tasks or key in self._ran:
            reason = schema.DUPLICATE
        elif self.state != "ready":
            reason = f"worker is {self.state}"
        elif self.in_flight >= self.model.capacity:
            reason = "worker is full"
        else:
            reason = ""
        if reason:
            await self._answer(msg, False, reason)
            return
        self._ran.add(key)
        started = schema.Started(
            request.request_id, self.worker_id, self.cluster, self.settings.heartbeat_s, request.attempt
        )
        task = asyncio.create_task(self._runner.run(request, started), name=f"request-{key}")
        self._tasks[key] = task
        if owner := native_user(request):
            self._owners[key] = owner
        task.add_done_callback(lambda _t, k=key: self._request_done(k))
        if self.in_flight >= self.model.capacity:
            self._beat_now.set()  # full: routers should stop sending here before the next beat
        await self._answer(msg, True)

    async def _answer(self, msg, accepted: bool, reason: str = "") -> None:
        if not msg.reply:
            return
        reply = schema.DispatchReply(accepted, reason, self.in_flight)
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(schema.encode(reply))

    def _request_done(self, key: str) -> None:
        was_full = self.in_flight >= self.model.capacity
        self._tasks.pop(key, None)
        self._owners.pop(key, None)
        self.served += 1
        self._last_done = time.monotonic()
        if was_full:
            self._beat_now.set()  # a slot opened: routers holding requests should hear it now

    @guarded
    async def _on_cancel(self, msg) -> None:
        try:
            cancel = schema.cancel_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        # From a NATS-native caller (cancel.user.<name>): only its own runs stop.
        owner = msg.subject.rpartition(".")[2] if msg.subject != self._cancel_subject else ""
        rid = cancel.request_id
        self._cancelled.add(cancel, owner)
        if cancel.attempt is None:
            keys = [k for k in self._tasks if k.rpartition(":")[0] == rid]
        else:
            key = schema.run_key(rid, cancel.attempt)
            keys = [key] if key in self._tasks else []
        for key in keys:
            if owner and self._owners.get(key) != owner:
                continue
            self._log.info("request_cancelled", request_id=rid, reason=cancel.reason[:200])
            self._tasks[key].cancel("cancelled")
