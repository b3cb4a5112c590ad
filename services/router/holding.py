"""Requests held for a model until a worker can take them, with deadlines.

Which one goes next when a worker frees a slot: a request handed back (its worker refused it or
vanished) first; then interactive before batch; within a class, the user served longest ago, and
that user's oldest request. So one user's thousand queued requests do not starve another user's
one, and a batch flood does not hold up an interactive user. A request that comes back (its
caller re-submitted it after losing the router that held it) keeps its place by the time it was
first sent, not at the back of the queue.
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
    items: deque[Held] = field(default_factory=deque)  # in arrival order (by first submission)
    _front: int = 0  # how many items at the head were handed back: they go first, in order
    _served: dict[str, int] = field(default_factory=dict)  # user -> when last served (a counter)
    _turn: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def push(self, held: Held) -> int:
        """Append, or for a re-submitted request, insert by its first submission; returns the position."""
        created = held.request.created
        if held.request.attempt and self.items and self.items[-1].request.created > created:
            for i, other in enumerate(self.items):
                if i >= self._front and other.request.created > created:
                    self.items.insert(i, held)
                    return i + 1
        self.items.append(held)
        return len(self.items)

    def push_front(self, held: Held) -> None:
        self.items.appendleft(held)
        self._front += 1

    def pop(self) -> Held | None:
        """The next request to dispatch (the module's docstring says which)."""
        if not self.items:
            return None
        if self._front:
            self._front -= 1
            return self.items.popleft()
        best, best_key, seen = 0, None, set()
        for i, held in enumerate(self.items):
            who = (_class(held.request), _user(held.request))
            if who in seen:
                continue  # only each user's oldest request of a class can be next
            seen.add(who)
            key = (who[0], self._served.get(who[1], 0))
            if best_key is None or key < best_key:
                best, best_key = i, key
        held = self.items[best]
        del self.items[best]
        self._turn += 1
        self._served[_user(held.request)] = self._turn
        if len(self._served) > 4 * len(self.items) + 1024:  # forget users no longer waiting
            waiting = {_user(h.request) for h in self.items}
            self._served = {u: t for u, t in self._served.items() if u in waiting}
        return held

    def remove(self, request_id: str, attempt: int | None = None, *, owner: str = "") -> Held | None:
        """Take out the request (only that attempt of it, if given; only if ``owner``, a
        NATS-native caller, sent it, if given)."""
        for held in self.items:
            r = held.request
            if r.request_id == request_id and attempt in (None, r.attempt) and may_stop(owner, r):
                self._take(held)
                return held
        return None

    def expired(self) -> list[Held]:
        now = self.clock()
        gone = [h for h in self.items if h.deadline <= now]
        for h in gone:
            self._take(h)
        return gone

    def _take(self, held: Held) -> None:
        i = self.items.index(held)
        del self.items[i]
        if i < self._front:
            self._front -= 1

    def oldest_wait(self) -> float:
        return self.clock() - self.items[0].enqueued if self.items else 0.0


def _class(request: schema.InferRequest) -> int:
    return 0 if request.priority == "interactive" else 1


def _user(request: schema.InferRequest) -> str:
    return request.identity.user if request.identity is not None else ""


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
