"""The worker service: heartbeats, admission, streaming to the requester, cancel and drain."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from typing import Any

import msgspec
import nats.errors
import orjson
import structlog
from nats.aio.client import Client as NATS
from structlog.contextvars import bound_contextvars

from services.worker.engines.base import Engine
from shared import config as cfg
from shared import errors, schema
from shared.book import RecentIds
from shared.connect import unsubscribe
from shared.lifecycle import Lifecycle
from shared.subjects import Subjects

_END = object()


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
    ):
        self.nc, self.subjects, self.settings = nc, subjects, settings
        self.model, self.cluster, self.engine = model, cluster, engine
        self.worker_id = worker_id or default_worker_id(cluster, model.id)
        self.node_id = node_id
        self.state: schema.WorkerState = "starting"
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancelled = RecentIds()
        self._subs: list = []
        self._infer_sub = None
        self._beat_now = asyncio.Event()
        self._heartbeat_task: asyncio.Task | None = None
        self._last_done = time.monotonic()
        self._started = False
        self._log = structlog.get_logger().bind(worker_id=self.worker_id, model=model.id)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="worker-heartbeats")
        self._subs.append(await self.nc.subscribe(self.subjects.cancel, cb=self._on_cancel))
        self._set_state("loading")
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

    async def drain(self) -> None:
        """Take no new requests, finish the ones in flight (up to drain_timeout_s), then stop."""
        if self.state in ("draining", "stopped"):
            return
        self._set_state("draining")
        await self._unsubscribe_infer()
        if self._tasks:
            self._log.info("worker_draining", in_flight=self.in_flight)
            _, pending = await asyncio.wait(list(self._tasks.values()), timeout=self.settings.drain_timeout_s)
            if pending:
                self._log.warning("drain_timeout", abandoned=len(pending))
        await self.stop()

    async def stop(self) -> None:
        if self.state == "stopped":
            return
        self.state = "stopped"
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
        self._log.info("worker_stopped")

    async def _unsubscribe_infer(self) -> None:
        sub, self._infer_sub = self._infer_sub, None
        await unsubscribe([sub] if sub else [])

    # --- heartbeats ----------------------------------------------------------------------------

    def _set_state(self, state: schema.WorkerState) -> None:
        self.state = state
        self._beat_now.set()

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self._publish_heartbeat()
            except nats.errors.Error as exc:
                self._log.warning("heartbeat_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_s):
                    await self._beat_now.wait()
            self._beat_now.clear()

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
            engine=await self.engine.load() if self.state == "ready" else schema.EngineLoad(),
            node_id=self.node_id,
            sent=time.time(),
        )
        await self.nc.publish(self.subjects.heartbeat(self.cluster, self.worker_id), schema.encode(beat))

    # --- requests ------------------------------------------------------------------------------

    async def _on_dispatch(self, msg) -> None:
        try:
            request = schema.infer_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            await msg.respond(schema.encode(schema.DispatchReply(False, f"undecodable request: {exc}")))
            return
        if request.request_id in self._cancelled:
            reason = schema.CANCELLED
        elif self.state != "ready":
            reason = f"worker is {self.state}"
        elif self.in_flight >= self.model.capacity:
            reason = "worker is full"
        elif request.request_id in self._tasks:
            reason = "duplicate request"
        else:
            reason = ""
        if reason:
            await msg.respond(schema.encode(schema.DispatchReply(False, reason)))
            return
        task = asyncio.create_task(self._serve(request), name=f"request-{request.request_id}")
        self._tasks[request.request_id] = task
        task.add_done_callback(lambda _t, rid=request.request_id: self._request_done(rid))
        if self.in_flight >= self.model.capacity:
            self._beat_now.set()  # full: routers should stop sending here before the next beat
        await msg.respond(schema.encode(schema.DispatchReply(True)))

    def _request_done(self, request_id: str) -> None:
        was_full = self.in_flight >= self.model.capacity
        self._tasks.pop(request_id, None)
        self._last_done = time.monotonic()
        if was_full or not self._tasks:
            self._beat_now.set()  # a slot opened: routers holding requests should hear it now

    async def _on_cancel(self, msg) -> None:
        try:
            cancel = schema.cancel_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        self._cancelled.add(cancel.request_id)
        task = self._tasks.get(cancel.request_id)
        if task is not None:
            self._log.info("request_cancelled", request_id=cancel.request_id, reason=cancel.reason)
            task.cancel("cancelled")

    async def _serve(self, request: schema.InferRequest) -> None:
        with bound_contextvars(request_id=request.request_id):
            started = time.monotonic()
            reply = request.reply_to
            outcome = "ok"
            usage = schema.Usage()
            try:
                await self.nc.publish(
                    reply, schema.encode(schema.Started(request.request_id, self.worker_id, self.cluster))
                )
                body = _decode_body(request.body)
                usage = await self._stream(request, body)
            except asyncio.CancelledError:
                outcome = "cancelled"
                if self.state == "stopped":  # not the client's doing: tell it
                    await self._send_error(request, errors.EngineError("the worker stopped"))
                raise
            except errors.FirstError as exc:
                outcome = exc.code
                await self._send_error(request, exc)
            except Exception as exc:
                outcome = "engine_error"
                self._log.exception("engine_failed")
                await self._send_error(request, errors.EngineError(f"engine failed: {exc}"))
            finally:
                self._log.info(
                    "request_served",
                    outcome=outcome,
                    endpoint=request.endpoint,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    seconds=round(time.monotonic() - started, 4),
                )

    async def _send_error(self, request: schema.InferRequest, exc: errors.FirstError) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(request.reply_to, schema.encode(exc.to_wire(request.request_id)))

    async def _stream(self, request: schema.InferRequest, body: dict[str, Any]) -> schema.Usage:
        """Pump engine events into a queue; send what has piled up as one Chunk per NATS message."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for event in self.engine.generate(request.endpoint, body):
                    queue.put_nowait(event)
                queue.put_nowait(_END)
            except Exception as exc:
                queue.put_nowait(exc)

        pumping = asyncio.create_task(pump(), name=f"engine-{request.request_id}")
        pack_s = self.settings.pack_interval_ms / 1000
        seq, last_sent = 0, 0.0
        usage = schema.Usage()
        try:
            while True:
                batch = [await queue.get()]
                if pack_s and (wait := last_sent + pack_s - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                while not queue.empty():
                    batch.append(queue.get_nowait())
                deltas, done = [], False
                for item in batch:
                    if item is _END:
                        done = True
                    elif isinstance(item, Exception):
                        raise item
                    elif isinstance(item, schema.Usage):
                        usage = item
                    else:
                        deltas.append(item)
                chunk = schema.Chunk(
                    request.request_id, seq, deltas, usage=usage if done else None, done=done
                )
                await self.nc.publish(request.reply_to, schema.encode(chunk))
                seq += 1
                last_sent = time.monotonic()
                if done:
                    return usage
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping


def _decode_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise errors.BadRequest("request body must be a JSON object")
    return body
