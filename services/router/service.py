"""The router service: takes requests on a queue group, dispatches them to workers, holds them while cold.

Tokens never pass through here: the worker streams straight to the request's reply subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from structlog.contextvars import bound_contextvars

from services.router.holding import Held, ModelQueue
from services.router.registry import Registry
from services.router.status import ClusterView
from shared import config as cfg
from shared import errors, schema
from shared.book import RecentIds
from shared.connect import unsubscribe
from shared.lifecycle import Lifecycle
from shared.subjects import ROUTERS_QUEUE, Subjects


class Router(Lifecycle):
    def __init__(self, nc: NATS, subjects: Subjects, config: cfg.Config, *, router_id: str = ""):
        self.nc, self.subjects, self.config = nc, subjects, config
        self.settings = config.router
        self.router_id = router_id or f"router-{uuid.uuid4().hex[:8]}"
        self.registry = Registry(self.settings.missed_heartbeats)
        self.view = ClusterView(config, self.registry, start_timeout_s=config.scaler.start_timeout_s)
        self.queues = {m.id: ModelQueue(self.settings.max_queue) for m in config.models}
        self._wake = {m.id: asyncio.Event() for m in config.models}
        self._published: dict[str, int] = {}
        self._cancelled = RecentIds()  # the queue length each model's last Demand said
        self._tasks: list[asyncio.Task] = []
        self._subs: list = []
        self._started = False
        self._log = structlog.get_logger().bind(service="router", router_id=self.router_id)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        s, nc = self.subjects, self.nc
        self._subs += [
            await nc.subscribe(s.heartbeat_all, cb=self._on_heartbeat),
            await nc.subscribe(s.cancel, cb=self._on_cancel),
            await nc.subscribe(s.demand, cb=self._on_demand),
            await nc.subscribe(s.node_events, cb=self._on_node_event),
            await nc.subscribe(s.infer, queue=ROUTERS_QUEUE, cb=self._on_infer),
            await nc.subscribe(s.status, queue=ROUTERS_QUEUE, cb=self._on_status),
        ]
        for model in self.queues:
            self._tasks.append(asyncio.create_task(self._dispatcher(model), name=f"dispatch-{model}"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="router-housekeeping"))
        self._log.info("router_started", models=list(self.queues))

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await unsubscribe(self._subs)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        # Held requests would otherwise wait for a timeout: tell their callers now.
        for model, queue in self.queues.items():
            while (held := queue.pop()) is not None:
                await self._reply_error(
                    held.request, errors.NoCapacity("the router is shutting down", retry_after_s=1)
                )
            await self._publish_demand(model)
        self._log.info("router_stopped")

    # --- requests ------------------------------------------------------------------------------

    async def _on_infer(self, msg) -> None:
        try:
            request = schema.infer_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            err = errors.BadRequest(f"undecodable InferRequest: {exc}")
            await msg.respond(schema.encode(err.to_wire("")))
            return
        with bound_contextvars(request_id=request.request_id):
            queue = self.queues.get(request.model)
            if queue is None:
                known = ", ".join(self.queues) or "none"
                err = errors.ModelNotFound(
                    f"The model '{request.model}' does not exist (served here: {known}).", param="model"
                )
                await msg.respond(schema.encode(err.to_wire(request.request_id)))
                return
            if queue.full:
                err = errors.NoCapacity(
                    f"too many requests are waiting for '{request.model}'",
                    retry_after_s=self.settings.retry_after_s,
                )
                await msg.respond(schema.encode(err.to_wire(request.request_id)))
                return
            now = time.monotonic()
            model = self.config.model(request.model)
            timeout = request.queue_timeout_s or model.queue_timeout_s or self.settings.queue_timeout_s
            cold = len(queue) > 0 or self.registry.pick(request.model) is None
            position = queue.push(Held(request, msg.data, now, now + timeout))
            await msg.respond(
                schema.encode(schema.Accepted(request.request_id, self.router_id, position if cold else 0))
            )
            if cold and position == 1:
                await self._publish_demand(request.model)  # the scaler hears of a cold model at once
            self._wake[request.model].set()

    async def _dispatcher(self, model: str) -> None:
        """Send this model's held requests to workers, oldest first, as slots open."""
        queue, wake = self.queues[model], self._wake[model]
        while True:
            deadline = queue.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await wake.wait()
            wake.clear()
            for held in queue.expired():
                waited = time.monotonic() - held.enqueued
                await self._reply_error(
                    held.request,
                    errors.NoCapacity(
                        f"no worker for '{model}' became free within {waited:.0f} s",
                        retry_after_s=self.settings.retry_after_s,
                    ),
                )
            while (held := queue.pop()) is not None:
                if held.request.request_id in self._cancelled:
                    continue
                if not await self._dispatch(held):
                    queue.push_front(held)
                    break
            await self._publish_demand(model)

    async def _dispatch(self, held: Held) -> bool:
        """Try workers until one accepts. False when none can take it now."""
        request, tried = held.request, set()
        while (entry := self.registry.pick(request.model, exclude=tried)) is not None:
            wid = entry.worker_id
            tried.add(wid)
            try:
                msg = await self.nc.request(
                    self.subjects.worker_infer(wid), held.data, timeout=self.settings.dispatch_timeout_s
                )
            except nats.errors.NoRespondersError:
                self.registry.forget(wid)  # gone without a last heartbeat
                continue
            except nats.errors.TimeoutError:
                self.registry.refused(wid)
                self._log.warning("dispatch_timeout", worker_id=wid, request_id=request.request_id)
                continue
            reply = schema.dispatch_reply_decoder.decode(msg.data)
            if reply.reason == schema.CANCELLED:
                return True  # the caller left while the request was on its way: done with it
            if reply.accepted:
                self.registry.dispatched(wid)
                self._log.info(
                    "request_routed",
                    request_id=request.request_id,
                    model=request.model,
                    worker_id=wid,
                    cluster=entry.beat.cluster,
                    waited_s=round(time.monotonic() - held.enqueued, 4),
                )
                return True
            self.registry.refused(wid)
        return False

    async def _reply_error(self, request: schema.InferRequest, exc: errors.FirstError) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(request.reply_to, schema.encode(exc.to_wire(request.request_id)))

    async def _on_cancel(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            cancel = schema.cancel_decoder.decode(msg.data)
            self._cancelled.add(cancel.request_id)
            for model, queue in self.queues.items():
                if queue.remove(cancel.request_id):
                    self._log.info("held_request_cancelled", request_id=cancel.request_id)
                    await self._publish_demand(model)

    # --- what others report --------------------------------------------------------------------

    async def _on_heartbeat(self, msg) -> None:
        try:
            beat = schema.heartbeat_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        entry = self.registry.observe(beat)
        if entry is not None and entry.beat.state == "ready" and entry.free > 0 and beat.model in self._wake:
            self._wake[beat.model].set()

    async def _on_demand(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            demand = schema.demand_decoder.decode(msg.data)
            if demand.router_id != self.router_id:
                self.view.demand.observe(demand)

    async def _on_node_event(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            self.view.observe_node(schema.node_event_decoder.decode(msg.data))

    async def _on_status(self, msg) -> None:
        own = {model: len(q) for model, q in self.queues.items()}
        reply = schema.StatusReply(self.router_id, self.view.models(own))
        await msg.respond(schema.encode(reply))

    # --- periodic ------------------------------------------------------------------------------

    async def _publish_demand(self, model: str, *, force: bool = False) -> None:
        queue = self.queues[model]
        if not force and self._published.get(model) == len(queue):
            return
        self._published[model] = len(queue)
        demand = schema.Demand(
            router_id=self.router_id,
            model=model,
            queued=len(queue),
            oldest_wait_s=round(queue.oldest_wait(), 3),
            interval_s=self._demand_interval_s,
        )
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(self.subjects.demand, schema.encode(demand))

    _demand_interval_s = 1.0

    async def _housekeeping(self) -> None:
        """Forget silent workers; repeat demand while requests wait, so a restarted scaler hears it."""
        while True:
            await asyncio.sleep(self._demand_interval_s)
            for wid in self.registry.expire():
                self._log.warning("worker_lost", worker_id=wid)
            for model, queue in self.queues.items():
                if len(queue):
                    await self._publish_demand(model, force=True)
                    self._wake[model].set()
