"""Requests held for a model until a worker can take them: first in first out, with deadlines.

A request that comes back (its caller re-submitted it after losing the router that held it)
takes its place by the time it was first sent, not at the back of the queue.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shared import schema
from shared.cancels import may_stop


@dataclass(slots=True)
class Held:
    request: schema.InferRequest
    data: bytes  # the encoded request, forwarded to the worker as is
    enqueued: float
    deadline: float
    announced: bool = False  # the caller was told (Accepted) that this router holds it
    dispatches: int = 0  # how often this router has sent it to a worker


@dataclass
class ModelQueue:
    clock: Callable[[], float] = time.monotonic
    items: deque[Held] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self.items)

    def push(self, held: Held) -> int:
        """Append, or for a re-submitted request, insert by its first submission; returns the position."""
        created = held.request.created
        if held.request.attempt and self.items and self.items[-1].request.created > created:
            for i, other in enumerate(self.items):
                if other.request.created > created:
                    self.items.insert(i, held)
                    return i + 1
        self.items.append(held)
        return len(self.items)

    def push_front(self, held: Held) -> None:
        self.items.appendleft(held)

    def pop(self) -> Held | None:
        return self.items.popleft() if self.items else None

    def remove(self, request_id: str, attempt: int | None = None, *, owner: str = "") -> Held | None:
        """Take out the request (only that attempt of it, if given; only if ``owner``, a
        NATS-native caller, sent it, if given)."""
        for held in self.items:
            r = held.request
            if r.request_id == request_id and attempt in (None, r.attempt) and may_stop(owner, r):
                self.items.remove(held)
                return held
        return None

    def expired(self) -> list[Held]:
        now = self.clock()
        gone = [h for h in self.items if h.deadline <= now]
        for h in gone:
            self.items.remove(h)
        return gone

    def oldest_wait(self) -> float:
        return self.clock() - self.items[0].enqueued if self.items else 0.0


class Queues:
    """Every queue a router holds: one per model for requests any cluster may serve (``any``),
    and one per (model, cluster) for requests pinned to that cluster (``pinned``), so that each
    waits only for its own workers."""

    def __init__(self, models: list[str]):
        self.any: dict[str, ModelQueue] = {m: ModelQueue() for m in models}
        self.pinned: dict[tuple[str, str], ModelQueue] = {}

    def of(self, model: str, cluster: str = "") -> ModelQueue:
        """The queue, made on first use for a pinned one (the cluster was checked at admission:
        a bounded set)."""
        if not cluster:
            return self.any[model]
        queue = self.pinned.get((model, cluster))
        if queue is None:
            queue = self.pinned[(model, cluster)] = ModelQueue()
        return queue

    def get(self, model: str, cluster: str = "") -> ModelQueue | None:
        return self.any.get(model) if not cluster else self.pinned.get((model, cluster))

    def all(self) -> list[tuple[tuple[str, str], ModelQueue]]:
        """``((model, cluster or ""), queue)`` for every queue."""
        return [((m, ""), q) for m, q in self.any.items()] + list(self.pinned.items())

    def held(self, model: str) -> int:
        """Requests for the model held here, pinned or not."""
        return len(self.any[model]) + sum(len(q) for (m, _), q in self.pinned.items() if m == model)
