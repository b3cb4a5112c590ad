"""One run of a request on a worker: the engine's output to the caller's stream, then a usage record.

The engine hands over its events in batches (what one read from it brought); each batch goes out
as one Chunk, one delta per choice (bounded in size, so a message never exceeds NATS's
max_payload). At engine speed one token is one message; a fast engine's tokens travel together.
With ``worker.pack_interval_ms`` a pump task reads ahead into a queue, and the sender waits out
the interval between messages. A caller that did not ask to stream gets its answer in as few
messages as fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import orjson
import structlog
from nats.aio.client import Client as NATS
from structlog.contextvars import bind_contextvars

from services.worker.engines.base import Batch, Engine
from shared import errors, schema, usage_stream
from shared.subjects import Subjects

_END = object()
STARTED_ALONE_AFTER_S = 0.05
_CHUNK_OVERHEAD = 256  # a Chunk's fields besides the text, with room to spare


@dataclass(slots=True)
class Progress:
    started: schema.Started | None  # not sent yet: it goes with the first Chunk, or on its own soon
    sending: asyncio.Future | None = None
    seq: int = 0  # the next Chunk's number
    tokens: int = 0  # text deltas sent so far
    first_token: float | None = None
    usage: schema.Usage | None = None
    pending: list[schema.Delta] = field(default_factory=list)


class Runner:
    """What every run on this worker shares: the connection, the engine and the worker's identity."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        engine: Engine,
        *,
        worker_id: str,
        cluster: str,
        pack_interval_s: float,
        stopping: Callable[[], bool],
    ):
        self.nc, self.subjects, self.engine = nc, subjects, engine
        self.worker_id, self.cluster = worker_id, cluster
        self.pack_interval_s = pack_interval_s
        self.stopping = stopping  # true when the worker, not the caller, ends the run
        self._log = structlog.get_logger().bind(worker_id=worker_id)

    @property
    def max_text_bytes(self) -> int:
        return max(1024, min(self.nc.max_payload, 1 << 20) // 2 - _CHUNK_OVERHEAD)

    async def run(self, request: schema.InferRequest, started: schema.Started) -> None:
        # This runs in a task of its own, whose context is a copy: the binding ends with it.
        bind_contextvars(request_id=request.request_id)
        began = time.monotonic()
        progress = Progress(started)
        # An answer that begins at once takes its Started along in its first Chunk; one that does
        # not (a prefill, the engine's queue) sends it on its own, so its caller can watch us.
        timer = asyncio.get_running_loop().call_later(
            STARTED_ALONE_AFTER_S, self._start_sending_started, request, progress
        )
        outcome = "ok"
        body: dict[str, Any] = {}
        try:
            body = _decode_body(request.body)
            if request.endpoint == "embedding":
                await self._embed(request, body, progress)
            else:
                await self._relay(request, body, progress)
        except asyncio.CancelledError:
            outcome = "cancelled"
            if self.stopping():  # not the caller's doing: tell it
                if progress.tokens == 0:
                    outcome = "retried"
                    retry = schema.Retry(request.request_id, request.attempt, "the worker stopped")
                    await self._send(request, retry)
                else:
                    await self._send(
                        request,
                        errors.EngineError("the worker stopped mid-answer").to_wire(
                            request.request_id, request.attempt
                        ),
                    )
            raise
        except errors.FirstError as exc:
            outcome = exc.code
            await self._send(request, exc.to_wire(request.request_id, request.attempt))
        except nats.errors.Error as exc:  # the answer cannot reach the caller now; it will notice
            outcome = "nats_error"
            self._log.warning("answer_not_sent", error=repr(exc))
        except Exception:
            outcome = "engine_error"
            self._log.exception("engine_failed")
            err = errors.EngineError("the engine failed; the worker's log has the details")
            await self._send(request, err.to_wire(request.request_id, request.attempt))
        finally:
            timer.cancel()
            await self._account(request, body, progress, outcome, began)

    async def _relay(self, request: schema.InferRequest, body: dict[str, Any], progress: Progress) -> None:
        stream = body.get("stream") is True
        events = self.engine.generate(request.endpoint, body, stream=stream)
        if not stream:  # one answer at the end
            async for batch in events:
                _note(progress, batch)
            await self._flush(request, progress, True)
            return
        if not self.pack_interval_s:
            # Each batch is what one read from the engine brought: send it as it comes. The
            # Usage comes last, so the batch that holds it ends the answer; the engine is still
            # read to its end (its connection then serves the next request).
            ended = False
            async for batch in events:
                if not ended:
                    ended = _note(progress, batch)
                    await self._flush(request, progress, ended)
            if not ended:
                await self._flush(request, progress, True)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for batch in events:
                    queue.put_nowait(batch)
                queue.put_nowait(_END)
            except Exception as exc:
                queue.put_nowait(exc)

        pumping = asyncio.create_task(pump(), name=f"engine-{request.request_id}")
        last_sent = 0.0
        try:
            while True:
                batch = [await queue.get()]
                if self.pack_interval_s and (wait := last_sent + self.pack_interval_s - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                while not queue.empty():
                    batch.append(queue.get_nowait())
                done = False
                for item in batch:
                    if item is _END:
                        done = True
                    elif isinstance(item, Exception):
                        raise item
                    else:
                        _note(progress, item)
                await self._flush(request, progress, done)
                last_sent = time.monotonic()
                if done:
                    return
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping

    async def _embed(self, request: schema.InferRequest, body: dict[str, Any], progress: Progress) -> None:
        """An embeddings request: one answer, its vectors in as few Chunks as the payload allows."""
        found, progress.usage = await self.engine.embed(body)
        progress.first_token = time.monotonic()
        parts: list[list[schema.Embedding]] = [[]]
        size = 0
        for index, vector in enumerate(found):
            if size + len(vector) > self.max_text_bytes and parts[-1]:
                parts.append([])
                size = 0
            parts[-1].append(schema.Embedding(vector, index))
            size += len(vector) + 16
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            chunk = schema.Chunk(
                request.request_id,
                progress.seq,
                usage=progress.usage if last else None,
                done=last,
                attempt=request.attempt,
                started=progress.started,
                embeddings=part,
            )
            progress.started = None
            progress.seq += 1
            await self.nc.publish(request.reply_to, schema.encode(chunk))

    async def _flush(self, request: schema.InferRequest, progress: Progress, done: bool) -> None:
        """Send the pending text, one delta per choice, as Chunks of at most ``max_text_bytes`` each."""
        if not done and not progress.pending:
            return
        deltas = _merged(progress.pending)
        progress.pending = []
        limit = self.max_text_bytes
        if sum(len(d.text) for d in deltas) * 4 <= limit:  # UTF-8: at most 4 bytes a character
            chunks = [deltas]
        else:
            chunks, size = [[]], 0
            for delta in _split(deltas, limit):
                n = len(delta.text.encode())
                if size + n > limit and chunks[-1]:
                    chunks.append([])
                    size = 0
                chunks[-1].append(delta)
                size += n
        for i, part in enumerate(chunks):
            last = done and i == len(chunks) - 1
            chunk = schema.Chunk(
                request.request_id,
                progress.seq,
                part,
                usage=progress.usage if last else None,
                done=last,
                attempt=request.attempt,
                started=progress.started,
            )
            progress.started = None
            progress.seq += 1
            await self.nc.publish(request.reply_to, schema.encode(chunk))

    def _start_sending_started(self, request: schema.InferRequest, progress: Progress) -> None:
        if progress.started is not None:
            started, progress.started = progress.started, None
            # Held by the run (a publish: done within this step of the loop).
            progress.sending = asyncio.ensure_future(self._send(request, started))

    async def _send(self, request: schema.InferRequest, message: schema.StreamMsg) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(request.reply_to, schema.encode(message))

    async def _account(
        self,
        request: schema.InferRequest,
        body: dict[str, Any],
        progress: Progress,
        outcome: str,
        began: float,
    ) -> None:
        """One usage record per run, whatever its outcome: the tokens produced so far count."""
        usage = progress.usage
        if usage is None:
            prompt = 0
            if body:
                with contextlib.suppress(Exception):
                    prompt = await self.engine.count_prompt_tokens(request.endpoint, body)
            usage = schema.Usage(prompt_tokens=prompt, completion_tokens=progress.tokens)
        now = time.monotonic()
        record = schema.UsageRecord(
            request_id=request.request_id,
            model=request.model,
            endpoint=request.endpoint,
            worker_id=self.worker_id,
            cluster=self.cluster,
            outcome=outcome,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            ttft_s=None if progress.first_token is None else round(progress.first_token - began, 6),
            duration_s=round(now - began, 6),
            attempt=request.attempt,
            created=request.created,
            sent=time.time(),
            identity=request.identity,
        )
        # Goes out with the answer's last message. The id makes the usage stream store a re-sent
        # record once (shared/usage_stream.py); it adds ~2.5 µs to this publish.
        headers = {usage_stream.MSG_ID: usage_stream.msg_id(request.request_id, request.attempt)}
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(self.subjects.usage, schema.encode(record), headers=headers)
        # The log line is written once the answer is on its way (call_soon keeps this context).
        asyncio.get_running_loop().call_soon(
            functools.partial(
                self._log.info,
                "request_served",
                outcome=outcome,
                endpoint=request.endpoint,
                attempt=request.attempt,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                seconds=round(now - began, 4),
            )
        )


def _note(progress: Progress, batch: Batch) -> bool:
    """Take in what the engine sent; True once its Usage (its last word) came."""
    if batch.tokens:
        progress.tokens += batch.tokens
        if progress.first_token is None:
            progress.first_token = time.monotonic()
    progress.pending += batch.deltas
    if batch.usage is not None:
        progress.usage = batch.usage
        return True
    return False


def _merged(deltas: list[schema.Delta]) -> list[schema.Delta]:
    """One delta per choice, its text joined and its finish reason kept: tokens that are sent
    together need no boundaries between them (readers join them anyway)."""
    if len(deltas) < 2:
        return deltas
    by_choice: dict[int, schema.Delta] = {}
    texts: dict[int, list[str]] = {}
    for d in deltas:
        texts.setdefault(d.index, []).append(d.text)
        seen = by_choice.setdefault(d.index, schema.Delta(index=d.index))
        if d.finish_reason is not None:
            seen.finish_reason = d.finish_reason
    for index, delta in by_choice.items():
        delta.text = "".join(texts[index])
    return list(by_choice.values())


def _split(deltas: list[schema.Delta], limit: int) -> list[schema.Delta]:
    """Deltas whose text is longer than ``limit`` bytes, cut into pieces that fit (the finish
    reason goes with the last piece)."""
    out = []
    step = max(1, limit // 4)  # UTF-8 is at most 4 bytes a character
    for d in deltas:
        if len(d.text) <= step:
            out.append(d)
            continue
        pieces = [d.text[i : i + step] for i in range(0, len(d.text), step)]
        out += [schema.Delta(text=p, index=d.index) for p in pieces[:-1]]
        out.append(schema.Delta(text=pieces[-1], index=d.index, finish_reason=d.finish_reason))
    return out


def _decode_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise errors.BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise errors.BadRequest("request body must be a JSON object")
    return body
