"""The router service: takes requests on a queue group, dispatches them to workers, holds them while cold.

Here: the Router's lifecycle and subscriptions, admission (which requests it takes, the error for
those it refuses), holding and draining the queues, cancels, what others report, its status
answers and Demand, and housekeeping. Elsewhere in the package, a module per concern:
handover.py sends a request to a worker and settles the dispatch (the worker's answer, "no
responders", the time-out); dispatch.py is the book of dispatches on their way; holding.py the
held requests' queues and which goes next; registry.py the workers and the routing choice;
affinity.py session affinity; callers.py NATS-native callers, native_limits.py their limits;
status.py a model's live status; request_events.py the events for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from services.router import callers
from services.router.affinity import Sessions
from services.router.cluster_access import ClusterAccess
from services.router.dispatch import Dispatches
from services.router.handover import Handover
from services.router.holding import Held, Queues
from services.router.native_limits import NativeLimits
from services.router.registry import Registry
from services.router.request_events import RequestEvents
from services.router.status import ClusterView
from shared import clusterstate, errors, events, schema
from shared import config as cfg
from shared.cancels import Cancels
from shared.children import cancel_and_wait
from shared.connect import unsubscribe
from shared.discovery import Registration, answerable
from shared.lifecycle import Lifecycle
from shared.subjects import ROUTER_SERVICE, ROUTERS_QUEUE, Subjects
from shared.supervise import Throttle, every, guarded

_TICK_S = 0.1  # housekeeping: dispatch timeouts, queue deadlines, heartbeats, demand
_DEMAND_INTERVAL_S = 1.0


def _shown(text: str, limit: int = 100) -> str:
    """User-supplied text echoed in a message, bounded."""
    return text if len(text) <= limit else text[:limit] + "…"


class Router(Lifecycle):
    def __init__(self, nc: NATS, subjects: Subjects, config: cfg.Config, *, router_id: str = ""):
        self.nc, self.subjects, self.config = nc, subjects, config
        self.settings = config.router
        self.router_id = router_id or f"router-{uuid.uuid4().hex[:8]}"
        self.registry = Registry(self.settings.missed_heartbeats)
        self.sessions = Sessions(self.registry)
        self.view = ClusterView(config, self.registry, start_timeout_s=config.scaler.start_timeout_s)
        self.held = Queues([m.id for m in config.models])
        self.queues, self.pinned = self.held.any, self.held.pinned  # by model; by (model, cluster)
        self._models = config.model_names()  # ids and aliases
        self.dispatches = Dispatches(self.settings.dispatch_timeout_s)
        self._cancelled = Cancels()
        self._published: dict[tuple[str, str], int] = {}  # the length each queue's last Demand said
        self.maintenance = clusterstate.MaintenanceFollower(nc, config, self._maintenance_changed)
        self.access = ClusterAccess(config, self.registry, self.maintenance)
        self.request_events = RequestEvents(events.EventPublisher(nc, subjects, self.router_id))
        self.native_limits = NativeLimits(nc, subjects, config, self.request_events.events)
        self.handover = Handover(
            nc, subjects, self.router_id, registry=self.registry, sessions=self.sessions,
            dispatches=self.dispatches, held=self.held, hand_back=functools.partial(self._hold, front=True),
            drain=self._drain, retry=self._retry, send=self._send,
        )  # fmt: skip
        self._next_beat = self._next_demand = 0.0
        self._bad_input = Throttle()
        self._task = None
        self._subs: list = []
        self._infer_subs: list = []
        self.held_total = 0  # requests that waited here (those sent to workers: handover.sent)
        self.discovery = Registration(
            nc, subjects, ROUTER_SERVICE, description="FIRST router: queues requests, dispatches to workers",
            counters=self._counters, metadata={"router_id": self.router_id}, instance=self.router_id,
        )  # fmt: skip
        self._log = structlog.get_logger().bind(service="router", router_id=self.router_id)

    async def start(self) -> None:
        if self._task is not None:
            return
        s, nc = self.subjects, self.nc
        self._subs += [
            await nc.subscribe(s.heartbeat_all, cb=self._on_heartbeat),
            await nc.subscribe(s.router_ack_all(self.router_id), cb=self.handover.on_ack),
            await nc.subscribe(s.cancel, cb=self._on_cancel),
            await nc.subscribe(s.cancel_users, cb=self._on_cancel),
            await nc.subscribe(s.demand, cb=self._on_demand),
            await nc.subscribe(s.node_events, cb=self._on_node_event),
        ]
        self._infer_subs += [
            await nc.subscribe(s.infer, queue=ROUTERS_QUEUE, cb=self._on_infer),
            await nc.subscribe(s.infer_users, queue=ROUTERS_QUEUE, cb=self._on_infer),
            await nc.subscribe(s.status, queue=ROUTERS_QUEUE, cb=self._on_status),
        ]
        self._task = asyncio.create_task(every(_TICK_S, self._housekeeping, name="router"), name="router")
        await self.maintenance.start()
        await self.native_limits.start()
        await self.request_events.events.emit("config", "loaded", models=list(self.queues))
        await self.discovery.start()
        self._log.info("router_started", models=list(self.queues))

    async def stop(self) -> None:
        """Take nothing new; hand every held request back to its caller (who submits it to another
        router at once), wait briefly for dispatches on their way, then leave."""
        if self._task is None:
            return
        await self.discovery.stop()
        await unsubscribe(self._infer_subs)
        await self.maintenance.stop()
        await self.native_limits.stop()
        for (model, cluster), queue in self.held.all():
            while (held := queue.pop()) is not None:
                await self._retry(held.request, "the router is shutting down")
            await self._publish_demand(model, cluster)
        await self.handover.settle(self.settings.dispatch_timeout_s)
        for pending in self.dispatches.expired(all_of_them=True):
            await self._retry(pending.held.request, "the router is shutting down")
        await cancel_and_wait(self._task)
        self._task = None
        await unsubscribe(self._subs)
        self._log.info("router_stopped")

    # --- admission -----------------------------------------------------------------------------

    async def submit(self, request: schema.InferRequest, data: bytes) -> bool:
        """A request from a caller in this process (shared.client.LocalRouter): as if it came on
        ``<p>.v1.infer``, without the round trip. False when this router is not running."""
        if self._task is None or not self._infer_subs:
            return False
        try:
            await self._admit(request, data)
        except Exception:
            self._log.exception("submit_failed", request_id=request.request_id)
            return False
        return True

    @guarded
    async def _on_infer(self, msg) -> None:
        user = callers.user_of(msg.subject) if msg.subject != self.subjects.infer else ""
        try:
            request = schema.infer_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            if msg.reply and (not user or msg.reply.startswith(callers.reply_prefix(self.subjects, user))):
                err = errors.BadRequest(f"undecodable InferRequest: {_shown(str(exc), 300)}")
                await self._send(msg.reply, err.to_wire(""))
            return
        data = msg.data
        if user:  # a NATS-native caller: it is who its subject says, and answers go to it only
            try:
                request, data = callers.admit(request, user, self.subjects, self.config)
                self.native_limits.admit(request)  # over a limit: RateLimited, below
            except callers.Refused as exc:
                if self._bad_input(msg.subject):
                    self._log.warning("request_refused", user=user, reason=str(exc))
                return
            except errors.FirstError as exc:
                await self._send(request.reply_to, exc.to_wire(request.request_id, request.attempt))
                return
        await self._admit(request, data)

    async def _admit(self, request: schema.InferRequest, data: bytes) -> None:
        rid = request.request_id
        if self._was_cancelled(request):
            return  # its caller cancelled it before it arrived
        if self.dispatches.taken(rid, request.attempt):
            err = errors.Conflict(f"request id {rid} (attempt {request.attempt}) was already submitted")
            await self._send(request.reply_to, err.to_wire(rid, request.attempt))
            return
        model = self._models.get(request.model)
        if model is None:
            known = ", ".join(self.queues) or "none"
            err = errors.ModelNotFound(
                f"The model '{_shown(request.model)}' does not exist (served here: {known}).", param="model"
            )
            await self._send(request.reply_to, err.to_wire(rid, request.attempt))
            return
        if model.id != request.model:  # an alias: queues, workers and usage know the id
            request = msgspec.structs.replace(request, model=model.id)
            data = schema.encode(request)
        cluster = request.cluster
        if not cluster and self.access.active:  # its caller may use only some of the clusters
            try:
                cluster = self.access.place(request.identity, model)
            except errors.FirstError as err:
                await self._send(request.reply_to, err.to_wire(rid, request.attempt))
                return
            if cluster:
                request = msgspec.structs.replace(request, cluster=cluster)
                data = schema.encode(request)
        if cluster and (err := self.access.refuse_pinned(model, cluster, request.identity)) is not None:
            await self._send(request.reply_to, err.to_wire(rid, request.attempt))
            return
        queue = self.held.of(model.id, cluster)
        entry = (
            None
            if queue
            else self.sessions.preferred(request) or self.registry.pick(model.id, cluster=cluster)
        )
        # The bound is on requests that wait: one a worker can take now is never refused for it.
        if entry is None and self._waiting(model.id, cluster) >= self.settings.max_queue:
            err = errors.NoCapacity(
                f"too many requests are waiting for '{model.id}'", retry_after_s=self.settings.retry_after_s
            )
            await self._send(request.reply_to, err.to_wire(rid, request.attempt))
            await self.request_events.failed(request, err.code, err.message)
            return
        self.dispatches.admitted(rid, request.attempt)
        now = time.monotonic()
        timeout = request.queue_timeout_s or model.queue_timeout_s or self.settings.queue_timeout_s
        held = Held(request, data, now, now + timeout)
        if entry is not None:
            await self.handover.dispatch(held, entry.worker_id)
        else:
            await self._hold(held)

    def _waiting(self, model: str, cluster: str) -> int:
        """Requests in this request's queue (the model's, or those pinned to ``cluster``), here and
        (as their Demand says) at other routers: each queue has its own bound, so requests waiting
        for a cold cluster never turn away those any cluster may serve."""
        return len(self.held.of(model, cluster)) + self.view.demand.queued(model, cluster=cluster)

    def _maintenance_changed(self, clusters: dict[str, str]) -> None:
        self.registry.maintenance = set(clusters)

    async def _hold(self, held: Held, *, front: bool = False) -> None:
        """Keep the request until a worker can take it; the caller learns who holds it."""
        model, cluster = held.request.model, held.request.cluster
        queue = self.held.of(model, cluster)
        if front:
            queue.push_front(held)
            position = 1
        else:
            position = queue.push(held)
        if not held.announced:
            held.announced = True
            self.held_total += 1
            r = held.request
            accepted = schema.Accepted(
                r.request_id, self.router_id, position, self.settings.heartbeat_s, r.attempt
            )
            await self._send(r.reply_to, accepted)
        if len(queue) == 1:
            await self._publish_demand(model, cluster)  # the scaler hears of a cold model at once

    # --- dispatch ------------------------------------------------------------------------------

    def _was_cancelled(self, request: schema.InferRequest) -> bool:
        return self._cancelled.stops(request)

    async def _drain(self, model: str, cluster: str = "") -> None:
        """Send the held requests of one queue (the model's, or those pinned to ``cluster``) to
        workers, oldest first, while any has a free slot."""
        queue = self.held.of(model, cluster)
        while queue and (entry := self.registry.pick(model, cluster=cluster)) is not None:
            held = queue.pop()
            if self._was_cancelled(held.request):
                continue
            entry = self.sessions.preferred(held.request) or entry
            if held.announced:
                self._log.info(
                    "held_request_dispatched",
                    request_id=held.request.request_id,
                    worker_id=entry.worker_id,
                    waited_s=round(time.monotonic() - held.enqueued, 3),
                )
            await self.handover.dispatch(held, entry.worker_id)
        await self._publish_demand(model, cluster)

    async def _retry(self, r: schema.InferRequest, reason: str) -> None:
        await self._send(r.reply_to, schema.Retry(r.request_id, r.attempt, reason))
        await self.request_events.retried(r, reason)

    async def _send(self, subject: str, message: msgspec.Struct) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(subject, schema.encode(message))

    @guarded
    async def _on_cancel(self, msg) -> None:
        try:
            cancel = schema.cancel_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        # From a NATS-native caller (cancel.user.<name>): only its own requests stop.
        owner = callers.user_of(msg.subject) if msg.subject != self.subjects.cancel else ""
        rid = cancel.request_id
        self._cancelled.add(cancel, owner)
        for (model, cluster), queue in self.held.all():
            if queue.remove(rid, cancel.attempt, owner=owner) is not None:
                self._log.info("held_request_cancelled", request_id=rid, reason=cancel.reason[:100])
                await self._publish_demand(model, cluster)
        if wid := self.dispatches.worker_of(rid):  # handed over already: the cancel follows it
            subject = (
                self.subjects.worker_cancel_user(wid, owner) if owner else self.subjects.worker_cancel(wid)
            )
            await self._send(subject, cancel)

    # --- what others report --------------------------------------------------------------------

    @guarded
    async def _on_heartbeat(self, msg) -> None:
        try:
            beat = schema.heartbeat_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            if self._bad_input(msg.subject):
                self._log.warning("bad_heartbeat", subject=msg.subject, error=_shown(str(exc), 200))
            return
        entry = self.registry.observe(beat)
        if entry is None or entry.free <= 0 or beat.model not in self.queues:
            return
        # The requests pinned to its cluster and those any cluster may serve: the older first.
        queues = [(q, c) for c in (beat.cluster, "") if (q := self.held.get(beat.model, c))]
        queues.sort(key=lambda qc: qc[0].items[0].request.created)
        for _, cluster in queues:
            await self._drain(beat.model, cluster)

    @guarded
    async def _on_demand(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            demand = schema.demand_decoder.decode(msg.data)
            if demand.router_id != self.router_id:
                self.view.demand.observe(demand)

    @guarded
    async def _on_node_event(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            self.view.observe_node(events.decode(msg.data))

    @guarded
    async def _on_status(self, msg) -> None:
        if not answerable(msg.reply):  # an inbox only: no caller may aim the answer at our subjects
            return
        own: dict[str, int] = {}
        for (model, _), q in self.held.all():
            own[model] = own.get(model, 0) + len(q)
        reply = schema.StatusReply(self.router_id, self.view.models(own))
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(schema.encode(reply))

    def _counters(self) -> dict:
        """For the service API's stats and status (shared/discovery.py)."""
        return {"requests_dispatched": self.handover.sent, "requests_held": self.held_total,
                "held_now": sum(len(q) for _, q in self.held.all()), "dispatches_unanswered": len(self.dispatches),
                "workers": len(self.registry.workers()), "models": list(self.queues)}  # fmt: skip

    # --- periodic ------------------------------------------------------------------------------

    async def _publish_demand(self, model: str, cluster: str = "", *, force: bool = False) -> None:
        """One Demand per queue: the model's, and each cluster's pinned requests for it."""
        queue = self.held.of(model, cluster)
        if not force and self._published.get((model, cluster)) == len(queue):
            return
        self._published[(model, cluster)] = len(queue)
        await self.request_events.queue_changed(model, cluster, len(queue))
        demand = schema.Demand(
            router_id=self.router_id,
            model=model,
            queued=len(queue),
            oldest_wait_s=round(queue.oldest_wait(), 3),
            interval_s=_DEMAND_INTERVAL_S,
            cluster=cluster,
        )
        await self._send(self.subjects.demand, demand)

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        for pending in self.dispatches.expired():
            await self.handover.timed_out(pending)
        for (model, _), queue in self.held.all():
            for held in queue.expired():
                waited = now - held.enqueued
                err = errors.NoCapacity(
                    f"no worker for '{model}' became free within {waited:.0f} s",
                    retry_after_s=self.settings.retry_after_s,
                )
                await self._send(
                    held.request.reply_to, err.to_wire(held.request.request_id, held.request.attempt)
                )
                await self.request_events.failed(held.request, err.code, err.message)
        if now >= self._next_beat:
            self._next_beat = now + self.settings.heartbeat_s
            held = sum(len(q) for _, q in self.held.all()) + len(self.dispatches)
            beat = schema.RouterBeat(self.router_id, self.settings.heartbeat_s, held, time.time())
            await self._send(self.subjects.router_heartbeat(self.router_id), beat)
        if now >= self._next_demand:
            # Forget silent workers; repeat demand while requests wait, so a restarted scaler hears it.
            self._next_demand = now + _DEMAND_INTERVAL_S
            self.dispatches.forget_started()
            for wid in self.registry.expire():
                self._log.warning("worker_lost", worker_id=wid)
                for request in self.dispatches.lost(wid):  # its caller may be watching only us
                    await self._retry(request, f"worker {wid} was lost before the answer began")
            for (model, cluster), queue in self.held.all():
                if queue:
                    await self._publish_demand(model, cluster, force=True)
                    await self._drain(model, cluster)
