"""The NATS-native client: send OpenAI requests over NATS, streamed or not, without HTTP.

The gateway uses it too, so HTTP and NATS callers take exactly the same path::

    client = FirstClient(nc, Subjects())
    await client.start()
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    async with client.open("m", "chat", body) as answer:
        async for chunk in answer:          # Chunk messages, in order
            ...
    result = await client.complete("m", "chat", body)   # or all at once

The client keeps each request alive through failures: it watches the heartbeats of whoever
holds the request (a router while it waits, a worker while it runs) and submits it again, under
a new attempt number, when that party dies before the answer has begun. Messages of any other
attempt are ignored (and a run that should not exist is cancelled), so a caller sees one answer.

Leaving ``open`` before the answer is done (an exception, a cancelled task) cancels the request
wherever it is: in a router's queue or on a worker's engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Protocol

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from shared import errors, schema
from shared.answer import KEEPALIVE, Answer, Call, Completion, Inbox, Signal
from shared.lifecycle import Lifecycle
from shared.liveness import Watches
from shared.subjects import Subjects
from shared.supervise import Throttle, every, guarded

_TICK_S = 0.1


def new_id() -> str:
    """A request or client id: 24 random hex digits. Not guessable: a request's id names its reply
    subject and its cancel, so one id must not tell anyone the next (0.5 µs, from os.urandom)."""
    return secrets.token_hex(12)


class LocalRouter(Protocol):
    """A router in the caller's own process (``first up`` runs one beside the gateway): requests
    go to it by a call instead of a NATS round trip. Everything after (its replies, dispatch,
    cancels) travels over NATS as usual, so the caller sees no difference but the time saved."""

    nc: NATS  # its connection, which the caller may share

    async def submit(self, request: schema.InferRequest, data: bytes) -> bool:
        """Take the request as if it came on ``<p>.v1.infer``; False if not running."""


class FirstClient(Lifecycle):
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        *,
        client_id: str | None = None,
        accept_timeout_s: float = 5.0,
        request_timeout_s: float = 600.0,
        stall_timeout_s: float = 120.0,
        missed_heartbeats: int = 3,
        max_attempts: int = 4,
        max_buffered_bytes: int = 8 << 20,
        local_router: LocalRouter | None = None,
        user: str = "",
    ):
        self.nc = nc
        self.subjects = subjects
        # ``user``: a NATS-native caller, whose NATS credentials name it: it submits, cancels and
        # reads its answers as that user (services/router/callers.py), its client id.
        self.user = user
        self.client_id = user or client_id or new_id()
        self._infer_subject = subjects.infer_user(user) if user else subjects.infer
        self._cancel_subject = subjects.cancel_user(user) if user else subjects.cancel
        self.accept_timeout_s = accept_timeout_s  # a submission nobody took up within this is sent again
        self.request_timeout_s = request_timeout_s  # until the answer begins (all waiting included)
        self.stall_timeout_s = stall_timeout_s  # silence allowed once text has begun
        self.max_attempts = max_attempts
        self.max_buffered_bytes = max_buffered_bytes  # a caller reading slower than this is cut off
        self.local_router = local_router
        self._calls: dict[str, Call] = {}
        self._watches = Watches(nc, missed_heartbeats)
        self._prefix = self.subjects.reply_stream(self.client_id, "x")[:-1]
        self._sub = None
        self._task: asyncio.Task | None = None
        self._paused = False
        self._noise = Throttle()
        self._log = structlog.get_logger()

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet answered to the end."""
        return len(self._calls)

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self.nc.subscribe(
                self.subjects.reply_stream_all(self.client_id), cb=self._on_reply
            )
            self._task = asyncio.create_task(every(_TICK_S, self._watchdog, name="client"), name="client")

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            await self._watches.close()

    # --- sending -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open(
        self,
        model: str,
        endpoint: schema.Endpoint,
        body: bytes,
        *,
        request_id: str | None = None,
        queue_timeout_s: float = 0.0,
        keepalive_s: float | None = None,
        identity: schema.Identity | None = None,
        cluster: str = "",
        priority: schema.Priority = "interactive",
        session: str = "",
    ) -> AsyncIterator[Answer]:
        """Send the request; yield its Answer. Raises FirstError subclasses for every failure.
        ``cluster``: run it only there (FIRST's cluster-pinned paths); empty: any cluster."""
        request_id = request_id or new_id()
        if request_id in self._calls:
            raise errors.Conflict(f"request id {request_id} is already in flight on this client")
        now = time.monotonic()
        request = schema.InferRequest(
            request_id=request_id,
            model=model,
            endpoint=endpoint,
            body=body,
            reply_to=self.subjects.reply_stream(self.client_id, request_id),
            created=time.time(),
            queue_timeout_s=queue_timeout_s,
            identity=identity,
            cluster=cluster,
            priority=priority,
            session=session,
        )
        call = Call(request, Inbox(), now + self.request_timeout_s, keepalive_s, last_delivered=now)
        self._calls[request_id] = call
        submitted = False
        try:
            await self._submit(call)
            submitted = True
            yield Answer(self, call)
        finally:
            del self._calls[request_id]
            if call.holder:
                self._watches.release(call.holder, request_id)
            if submitted and not call.done:
                await self._cancel(call, "client")

    async def _submit(self, call: Call) -> None:
        data = schema.encode(call.request)
        if len(data) > self.max_payload:
            raise errors.PayloadTooLarge(
                f"request is {len(data)} bytes; the NATS server accepts at most {self.max_payload}"
            )
        call.holder, call.submitted_at = "", time.monotonic()
        if self.local_router is not None and await self.local_router.submit(call.request, data):
            return
        try:
            # The reply subject is the request's own stream: a router's refusal comes there, and so
            # does NATS's "no responders" when no router is running.
            await self.nc.publish(self._infer_subject, data, reply=call.request.reply_to)
        except nats.errors.Error as exc:
            raise _bus_trouble(exc) from None

    async def _resubmit(self, call: Call, reason: str) -> None:
        """Send the request again under the next attempt number; the old attempt is forgotten."""
        request = call.request
        now = time.monotonic()
        if request.attempt + 1 >= self.max_attempts:
            raise errors.NoCapacity(f"the request could not be served ({reason})", retry_after_s=5.0)
        if now >= call.deadline:
            raise errors.EngineTimeout(f"the answer did not begin within {self.request_timeout_s:g} s")
        if call.holder:  # whoever may still have the old attempt: drop it
            await self._cancel(call, "superseded", attempt=request.attempt)
            self._watches.release(call.holder, request.request_id)
        call.request = msgspec.structs.replace(request, attempt=request.attempt + 1)
        call.started, call.seq, call.began = None, 0, False
        self._log.info(
            "request_resubmitted", request_id=request.request_id, attempt=request.attempt + 1, reason=reason
        )
        await self._submit(call)

    async def _cancel(self, call: Call, reason: str, *, attempt: int | None = None) -> None:
        request = call.request
        cancel = schema.Cancel(request.request_id, reason, attempt)
        if call.started is not None:  # the worker runs it: tell that worker only
            cancel.attempt = request.attempt
            subject = self._worker_cancel(call.started.worker_id)
        else:  # a router holds it, or is handing it over: routers pass it on
            subject = self._cancel_subject
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(subject, schema.encode(cancel))

    def _worker_cancel(self, worker_id: str) -> str:
        s = self.subjects
        return s.worker_cancel_user(worker_id, self.user) if self.user else s.worker_cancel(worker_id)

    async def cancel(self, request_id: str, reason: str = "client") -> None:
        """Stop one of this client's requests wherever it is."""
        if (call := self._calls.get(request_id)) is not None:
            call.done = True
            await self._cancel(call, reason)

    # --- receiving -----------------------------------------------------------------------------

    @guarded
    async def _on_reply(self, msg) -> None:
        call = self._calls.get(msg.subject[len(self._prefix) :])
        if msg.headers and msg.headers.get("Status") == "503":  # no router took the submission
            if call is not None and not call.holder:
                call.signal("no_router")
            return
        try:
            m = schema.stream_decoder.decode(msg.data)
        except msgspec.DecodeError:
            if self._noise(msg.subject):
                self._log.warning("undecodable_reply", subject=msg.subject)
            return  # what matters is kept in order by seq: a lost real message shows as a gap
        if call is None or m.attempt != call.request.attempt:
            if isinstance(m, schema.Started):  # a run nobody waits for
                await self._stop_run(m, "orphaned")
            return
        now = time.monotonic()
        call.last_message = now
        match m:
            case schema.Chunk():
                if m.started is not None and call.started is None:
                    await self._adopt(call, m.started)
                if call.overflowed:
                    return
                call.buffered += len(msg.data)
                if call.buffered > self.max_buffered_bytes:
                    call.overflowed = True
                    await self._cancel(call, "reader too slow")
                    call.signal("overflow")
                    return
                call.last_delivered = now
                if not call.began:
                    call.began = any(d.text for d in m.deltas) or m.done
                call.sizes.append(len(msg.data))
                call.put(m)
            case schema.Started():
                if call.started is not None:  # a second run of one attempt: keep the first
                    if m.worker_id != call.started.worker_id:
                        await self._stop_run(m, "duplicate")
                    return
                await self._adopt(call, m)
            case schema.Accepted():
                if call.started is None:
                    await self._hold(call, self.subjects.router_heartbeat(m.router_id), m.interval_s)
            case schema.Retry():
                if call.started is None:
                    call.signal("retry", m.reason)
            case schema.Error():
                call.put(m)

    async def _adopt(self, call: Call, started: schema.Started) -> None:
        """A worker runs the request: from now on, watch that worker."""
        call.started = started
        run = schema.run_key(started.request_id, started.attempt)
        await self._hold(call, self.subjects.worker_runs(started.worker_id), started.interval_s, run)

    async def _hold(self, call: Call, subject: str, interval_s: float, run: str = "") -> None:
        if call.holder and call.holder != subject:
            self._watches.release(call.holder, call.request.request_id)
        call.holder = subject
        await self._watches.hold(subject, interval_s, call.request.request_id, run)

    async def _stop_run(self, started: schema.Started, reason: str) -> None:
        cancel = schema.Cancel(started.request_id, reason, started.attempt)
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(self._worker_cancel(started.worker_id), schema.encode(cancel))

    async def _signal(self, call: Call, signal: Signal) -> None:
        """Act on what the watchdog or the reply handler put in the queue (in the caller's task)."""
        match signal.kind:
            case "retry":
                await self._resubmit(call, signal.reason or "its holder gave it back")
            case "lost":
                await self._lost(call, signal.reason)
            case "no_router":
                call.done = True
                raise errors.NoCapacity("no router is running", retry_after_s=5.0)
            case "timeout":  # not done: leaving ``open`` cancels the request wherever it waits
                raise errors.EngineTimeout(f"the answer did not begin within {self.request_timeout_s:g} s")
            case "stalled":
                raise errors.EngineTimeout(f"the engine sent nothing for {self.stall_timeout_s:g} s")
            case "overflow":
                call.done = True
                raise errors.EngineError("the answer came faster than it was read; the request was stopped")

    async def _lost(self, call: Call, reason: str) -> None:
        """The answer cannot go on as it was: run it again if the caller has seen no text yet."""
        if call.text_seen:
            call.done = True
            await self._cancel(call, "lost")
            raise errors.EngineError(f"{reason}; the answer is incomplete")
        await self._resubmit(call, reason)

    async def _watchdog(self) -> None:
        if not self.nc.is_connected:
            self._paused = True  # nobody can be heard now; judge nobody
            return
        now = time.monotonic()
        if self._paused:
            self._paused = False
            self._watches.resume()
            for call in self._calls.values():
                call.submitted_at = now
                if call.holder and call.started is None and not call.done:
                    # What its router said meanwhile (a dispatch, a refusal) may be lost: ask again.
                    call.signal("retry", "the connection to NATS was lost while a router held it")
        for subject, request_ids, why in await self._watches.sweep():
            for rid in request_ids:
                if (call := self._calls.get(rid)) is not None and call.holder == subject and not call.done:
                    if why == "silent":
                        what = "worker" if call.started else "router"
                        call.signal("lost", f"the {what} holding the request stopped answering")
                    else:
                        call.signal("lost", "the worker's answer went astray")
        for call in self._calls.values():
            if call.done:
                continue
            if not call.holder and call.submitted_at and now - call.submitted_at > self.accept_timeout_s:
                call.submitted_at = 0.0  # once
                call.signal("retry", f"no router took the request within {self.accept_timeout_s:g} s")
            elif not call.began and now > call.deadline:
                call.deadline = float("inf")
                call.signal("timeout")
            elif call.began and now - call.last_message > self.stall_timeout_s:
                call.last_message = now
                call.signal("stalled")
            if call.keepalive_s is not None and now - call.last_delivered >= call.keepalive_s:
                call.last_delivered = now
                call.put(KEEPALIVE)

    # --- convenience ---------------------------------------------------------------------------

    async def complete(self, model: str, endpoint: schema.Endpoint, body: bytes, **kw) -> Completion:
        result = Completion()
        async with self.open(model, endpoint, body, **kw) as answer:
            async for chunk in answer:
                if chunk is None:
                    continue
                for d in chunk.deltas:
                    result.texts[d.index] = result.texts.get(d.index, "") + d.text
                    if d.finish_reason is not None:
                        result.finish_reasons[d.index] = d.finish_reason
                for e in chunk.embeddings:
                    result.embeddings[e.index] = e.vector
                if chunk.usage is not None:
                    result.usage = chunk.usage
            if answer.started is not None:
                result.worker_id, result.cluster = answer.started.worker_id, answer.started.cluster
        return result

    async def status(self, timeout_s: float = 2.0) -> schema.StatusReply:
        try:
            msg = await self.nc.request(
                self.subjects.status, schema.encode(schema.StatusRequest()), timeout=timeout_s
            )
        except nats.errors.NoRespondersError:
            raise errors.NoCapacity("no router is running", retry_after_s=5.0) from None
        except nats.errors.TimeoutError:
            raise errors.NoCapacity("no router answered in time", retry_after_s=5.0) from None
        except nats.errors.Error as exc:
            raise _bus_trouble(exc) from None
        return schema.status_reply_decoder.decode(msg.data)


def _bus_trouble(exc: nats.errors.Error) -> errors.FirstError:
    if isinstance(exc, nats.errors.MaxPayloadError):
        return errors.PayloadTooLarge("the request is larger than the NATS server accepts")
    return errors.NoCapacity(f"the message bus is unavailable ({type(exc).__name__})", retry_after_s=2.0)
