"""One request's answer as its caller reads it: the messages and signals that arrive for it, in
order, and the Answer that iterates them.

``shared.client.FirstClient`` fills a Call's inbox from NATS (and from its watchdog); the caller's
task reads it through Answer, which hands what is not a Chunk back to the client to act on
(submit again, give up), so that every decision about a request is made in its caller's task.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared import errors, schema

if TYPE_CHECKING:
    from shared.client import FirstClient


@dataclass
class Completion:
    """A whole answer: the text and finish reason of each choice, and the token counts."""

    texts: dict[int, str] = field(default_factory=dict)
    finish_reasons: dict[int, str | None] = field(default_factory=dict)
    usage: schema.Usage = field(default_factory=schema.Usage)
    worker_id: str = ""
    cluster: str = ""  # the worker's
    embeddings: dict[int, bytes] = field(default_factory=dict)  # an embeddings answer: index -> vector


class Signal:
    """Something the client itself puts in a request's queue (not a message from NATS), about the
    attempt that was current when it was put there."""

    def __init__(self, kind: str, reason: str = "", attempt: int = 0):
        self.kind, self.reason, self.attempt = kind, reason, attempt


KEEPALIVE = Signal("keepalive")


class Inbox:
    """What one request's caller has yet to read: a deque and one waiter (lighter than an
    asyncio.Queue, of which a caller needs neither the bound nor several readers)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: object) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> object:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


@dataclass(eq=False)
class Call:
    request: schema.InferRequest
    queue: Inbox
    deadline: float  # its answer must have begun by then (queues, cold starts and engine queues count)
    keepalive_s: float | None
    holder: str = ""  # the heartbeat subject of the router or worker holding it; "" while submitted
    submitted_at: float = 0.0
    started: schema.Started | None = None
    seq: int = 0
    text_seen: bool = False  # text was handed to the caller: no more transparent re-runs
    began: bool = False  # text has arrived (the deadline is met; from now on, silence is a stall)
    last_message: float = 0.0
    last_delivered: float = 0.0
    buffered: int = 0  # bytes of Chunks received and not yet read by the caller
    sizes: deque[int] = field(default_factory=deque)
    overflowed: bool = False
    done: bool = False

    def put(self, item: object) -> None:
        self.queue.put_nowait(item)

    def signal(self, kind: str, reason: str = "") -> None:
        self.queue.put_nowait(Signal(kind, reason, self.request.attempt))


class Answer:
    """The stream of one request's Chunks. Iterate it; ``started`` tells which worker serves it.
    Opened with ``keepalive_s``, it also yields None after each such stretch without a Chunk."""

    def __init__(self, client: FirstClient, call: Call):
        self.request_id = call.request.request_id
        self._client, self._call = client, call

    @property
    def started(self) -> schema.Started | None:
        return self._call.started

    @property
    def done(self) -> bool:
        return self._call.done

    def __aiter__(self) -> AsyncIterator[schema.Chunk | None]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[schema.Chunk | None]:
        call, client = self._call, self._client
        while not call.done:
            item = await call.queue.get()
            if isinstance(item, schema.Chunk):
                call.buffered -= call.sizes.popleft()
                if item.attempt != call.request.attempt:
                    continue  # queued before the request was submitted again
                if item.seq != call.seq:
                    await client._lost(
                        call, f"part of the answer was lost (chunk {item.seq}, expected {call.seq})"
                    )
                    continue
                call.seq += 1
                call.done = item.done
                if not call.text_seen and any(d.text for d in item.deltas):
                    call.text_seen = True
                yield item
            elif isinstance(item, schema.Error):
                if item.attempt != call.request.attempt:
                    continue
                call.done = True
                raise errors.from_wire(item)
            elif item is KEEPALIVE:
                yield None
            elif item.attempt == call.request.attempt:
                await client._signal(call, item)
