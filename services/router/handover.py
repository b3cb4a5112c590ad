"""Handing requests to workers: the dispatch, and what settles it (the worker's answer, NATS's
"no responders", or nothing in time).

Dispatch does not wait: the router publishes a request to a worker with a reply subject of its
own and goes on; the worker's DispatchReply (or NATS's "no responders") comes back on that
subject. Many requests of one model are on their way at once, and a slow worker or a slow round
trip delays only its own request. Tokens never pass through here: the worker streams straight
to the request's reply subject. The numbering and timing of the dispatches on their way is the
book in dispatch.py; this module is their NATS side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from services.router.affinity import Sessions
from services.router.dispatch import Dispatches, Pending
from services.router.holding import Held, Queues
from services.router.registry import Registry
from shared import errors, schema
from shared.subjects import Subjects
from shared.supervise import Throttle, guarded


class Handover:
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        router_id: str,
        *,
        registry: Registry,
        sessions: Sessions,
        dispatches: Dispatches,
        held: Queues,
        hand_back: Callable[[Held], Awaitable[None]],  # to the front of its queue
        drain: Callable[[str, str], Awaitable[None]],  # (model, cluster): dispatch what a worker can take
        retry: Callable[[schema.InferRequest, str], Awaitable[None]],  # tell the caller to submit again
        send: Callable[[str, msgspec.Struct], Awaitable[None]],
    ):
        self.nc, self.subjects = nc, subjects
        self.registry, self.sessions, self.dispatches, self.held = registry, sessions, dispatches, held
        self._hand_back, self._drain, self._retry, self._send = hand_back, drain, retry, send
        self._log = structlog.get_logger().bind(service="router", router_id=router_id)
        self._ack_prefix = subjects.router_ack(router_id, 0)[:-1]
        self._bad_input = Throttle()
        self._settled = asyncio.Event()  # no dispatch is waiting for its answer (stop waits for it)
        self.sent = 0  # requests sent to workers

    async def dispatch(self, held: Held, worker_id: str) -> None:
        held.dispatches += 1
        self.sent += 1
        self.sessions.served(held.request, worker_id)
        n = self.dispatches.add(held, worker_id)
        self.registry.dispatched(worker_id)
        try:
            await self.nc.publish(
                self.subjects.worker_infer(worker_id), held.data, reply=f"{self._ack_prefix}{n}"
            )
        except nats.errors.Error as exc:  # NATS trouble: the dispatch times out and the caller retries
            self._log.warning("dispatch_not_sent", worker_id=worker_id, error=repr(exc))

    async def settle(self, timeout_s: float) -> None:
        """Wait, at most ``timeout_s``, until no dispatch is waiting for its answer."""
        if len(self.dispatches):
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._settled.wait()

    @guarded
    async def on_ack(self, msg) -> None:
        gone = bool(msg.headers) and msg.headers.get("Status") == "503"  # no responders: no worker
        reply = None
        if not gone:
            try:
                reply = schema.dispatch_reply_decoder.decode(msg.data)
            except msgspec.DecodeError:
                # Not the worker's answer (a hostile or broken sender): the dispatch stays pending,
                # and the real answer, or the dispatch timeout, settles it.
                if self._bad_input(msg.subject):
                    self._log.warning("undecodable_dispatch_reply", subject=msg.subject)
                return
        try:
            pending = self.dispatches.resolve(int(msg.subject[len(self._ack_prefix) :]))
        except ValueError:
            return
        if pending is None:
            if self._bad_input("late_dispatch_reply"):
                self._log.info("late_dispatch_reply", subject=msg.subject, note="logged once a minute")
            return
        if not len(self.dispatches):
            self._settled.set()
        held, wid = pending.held, pending.worker_id
        request = held.request
        # Request ids go into these log lines by hand: binding contextvars costs on this path.
        if reply is None:
            self.registry.forget(wid)
            self._log.warning("worker_gone", worker_id=wid, request_id=request.request_id)
            await self._hand_back(held)
            await self._drain(request.model, request.cluster)
            return
        self.registry.answered(wid, reply.in_flight)
        # A duplicate for a request this router sent before: an earlier dispatch of ours reached the
        # worker after all (its answer was lost). The worker has it: that is an acceptance.
        if reply.accepted or (reply.reason == schema.DUPLICATE and held.dispatches > 1):
            self.dispatches.handed(request.request_id, request.attempt, wid)
            self.dispatches.accepted(held, wid)
            self._log.debug(
                "request_routed", worker_id=wid, model=request.model, request_id=request.request_id
            )
            if self.held.of(request.model, request.cluster):
                await self._drain(request.model, request.cluster)
            return
        if reply.reason == schema.CANCELLED:
            return
        if reply.reason == schema.DUPLICATE:  # the caller sent this attempt to another router too
            err = errors.Conflict(f"request id {request.request_id} is already running")
            await self._send(request.reply_to, err.to_wire(request.request_id, request.attempt))
            return
        self.registry.refused(wid)
        await self._hand_back(held)
        await self._drain(request.model, request.cluster)

    async def timed_out(self, pending: Pending) -> None:
        """The worker did not answer in time. It may still take the request, so this attempt is given
        up: the caller submits a new one, and ignores whatever the late run sends."""
        request = pending.held.request
        self.registry.answered(pending.worker_id, None)
        self.registry.refused(pending.worker_id)
        self._log.warning("dispatch_timeout", worker_id=pending.worker_id, request_id=request.request_id)
        await self._retry(pending.held.request, f"worker {pending.worker_id} did not answer in time")
