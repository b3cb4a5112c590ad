"""The NATS-native client: send OpenAI requests over NATS, streamed or not, without HTTP.

The gateway uses it too, so HTTP and NATS callers take exactly the same path::

    client = FirstClient(nc, Subjects())
    await client.start()
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    async with client.open("m", "chat", body) as answer:
        async for chunk in answer:          # Chunk messages, in order
            ...
    result = await client.complete("m", "chat", body)   # or all at once

Leaving ``open`` before the answer is done (an exception, a cancelled task) cancels the request
wherever it is: in a router's queue or on a worker's engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from shared import errors, schema
from shared.lifecycle import Lifecycle
from shared.subjects import Subjects


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Completion:
    """A whole answer: the text and finish reason of each choice, and the token counts."""

    texts: dict[int, str] = field(default_factory=dict)
    finish_reasons: dict[int, str | None] = field(default_factory=dict)
    usage: schema.Usage = field(default_factory=schema.Usage)
    worker_id: str = ""


class Answer:
    """The stream of one request's Chunks. Iterate it; ``started`` tells which worker serves it."""

    def __init__(self, client: FirstClient, request_id: str, queue: asyncio.Queue):
        self.request_id = request_id
        self.started: schema.Started | None = None
        self.done = False
        self._client = client
        self._queue = queue
        self._seq = 0

    def __aiter__(self) -> AsyncIterator[schema.Chunk]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[schema.Chunk]:
        while not self.done:
            msg = await self._next()
            match msg:
                case schema.Started():
                    self.started = msg
                case schema.Chunk():
                    if msg.seq != self._seq:
                        raise errors.EngineError(
                            f"part of the answer was lost (got chunk {msg.seq}, expected {self._seq})"
                        )
                    self._seq += 1
                    self.done = msg.done
                    yield msg
                case schema.Error():
                    self.done = True
                    raise errors.from_wire(msg)

    async def _next(self) -> schema.StreamMsg:
        c = self._client
        # Before a worker starts, the request may wait in a queue and behind a cold start.
        timeout = c.stall_timeout_s if self.started else c.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            if self.started:
                raise errors.EngineTimeout(f"the engine sent nothing for {timeout:g} s") from None
            raise errors.EngineTimeout(f"no worker answered within {timeout:g} s") from None


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
    ):
        self.nc = nc
        self.subjects = subjects
        self.client_id = client_id or new_id()
        self.accept_timeout_s = accept_timeout_s
        self.request_timeout_s = request_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._streams: dict[str, asyncio.Queue] = {}
        self._sub = None
        self._log = structlog.get_logger()

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self.nc.subscribe(
                self.subjects.reply_stream_all(self.client_id), cb=self._on_reply
            )

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _on_reply(self, msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        queue = self._streams.get(request_id)
        if queue is None:
            return  # the caller has gone; late messages are dropped
        try:
            queue.put_nowait(schema.stream_decoder.decode(msg.data))
        except msgspec.DecodeError as exc:
            queue.put_nowait(schema.Error(request_id, "engine_error", f"undecodable message: {exc}", 502))

    @contextlib.asynccontextmanager
    async def open(
        self,
        model: str,
        endpoint: schema.Endpoint,
        body: bytes,
        *,
        request_id: str | None = None,
        queue_timeout_s: float = 0.0,
    ) -> AsyncIterator[Answer]:
        """Send the request; yield its Answer. Raises FirstError subclasses for every failure."""
        request_id = request_id or new_id()
        request = schema.InferRequest(
            request_id=request_id,
            model=model,
            endpoint=endpoint,
            body=body,
            reply_to=self.subjects.reply_stream(self.client_id, request_id),
            created=time.time(),
            queue_timeout_s=queue_timeout_s,
        )
        data = schema.encode(request)
        if len(data) > self.max_payload:
            raise errors.PayloadTooLarge(
                f"request is {len(data)} bytes; the NATS server accepts at most {self.max_payload}"
            )
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        answer = Answer(self, request_id, queue)
        try:
            await self._submit(request_id, data)
            yield answer
        finally:
            self._streams.pop(request_id, None)
            if not answer.done:
                await self.cancel(request_id)

    async def _submit(self, request_id: str, data: bytes) -> None:
        try:
            msg = await self.nc.request(self.subjects.infer, data, timeout=self.accept_timeout_s)
        except nats.errors.NoRespondersError:
            raise errors.NoCapacity("no router is running", retry_after_s=5.0) from None
        except nats.errors.TimeoutError:
            raise errors.NoCapacity("no router answered in time", retry_after_s=5.0) from None
        reply = schema.router_reply_decoder.decode(msg.data)
        if isinstance(reply, schema.Error):
            raise errors.from_wire(reply)

    async def cancel(self, request_id: str, reason: str = "client") -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(self.subjects.cancel, schema.encode(schema.Cancel(request_id, reason)))

    async def complete(self, model: str, endpoint: schema.Endpoint, body: bytes, **kw) -> Completion:
        result = Completion()
        async with self.open(model, endpoint, body, **kw) as answer:
            async for chunk in answer:
                for d in chunk.deltas:
                    result.texts[d.index] = result.texts.get(d.index, "") + d.text
                    if d.finish_reason is not None:
                        result.finish_reasons[d.index] = d.finish_reason
                if chunk.usage is not None:
                    result.usage = chunk.usage
            if answer.started is not None:
                result.worker_id = answer.started.worker_id
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
        return schema.status_reply_decoder.decode(msg.data)
