"""Requests held for a model until a worker can take them: bounded, first in first out, with deadlines."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shared import schema


@dataclass(slots=True)
class Held:
    request: schema.InferRequest
    data: bytes  # the encoded request, forwarded to the worker as is
    enqueued: float
    deadline: float


@dataclass
class ModelQueue:
    max_len: int
    clock: Callable[[], float] = time.monotonic
    items: deque[Held] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.max_len

    def push(self, held: Held) -> int:
        self.items.append(held)
        return len(self.items)

    def push_front(self, held: Held) -> None:
        self.items.appendleft(held)

    def pop(self) -> Held | None:
        return self.items.popleft() if self.items else None

    def remove(self, request_id: str) -> bool:
        for held in self.items:
            if held.request.request_id == request_id:
                self.items.remove(held)
                return True
        return False

    def expired(self) -> list[Held]:
        now = self.clock()
        gone = [h for h in self.items if h.deadline <= now]
        for h in gone:
            self.items.remove(h)
        return gone

    def next_deadline(self) -> float | None:
        return min((h.deadline for h in self.items), default=None)

    def oldest_wait(self) -> float:
        return self.clock() - self.items[0].enqueued if self.items else 0.0
