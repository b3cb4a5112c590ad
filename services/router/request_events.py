"""The router's request events for operators: a queue that starts holding requests (a cold model,
a full cluster), the moment it empties again, and requests retried or failed.

Successes are not events (metrics count them). A queue is one event when it fills and one when it
empties, however many requests passed through; retries and failures come at most once a second
per model, each saying how many were left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared import schema
from shared.events import EventPublisher

_EVERY_S = 1.0


class RequestEvents:
    def __init__(self, events: EventPublisher, clock: Callable[[], float] = time.monotonic):
        self.events, self.clock = events, clock
        self._holding: dict[tuple[str, str], tuple[float, int]] = {}  # queue -> (since, most held)

    async def queue_changed(self, model: str, cluster: str, queued: int) -> None:
        key = (model, cluster)
        was = self._holding.get(key)
        if queued and was is None:
            self._holding[key] = (self.clock(), queued)
            await self.events.emit("request", "held", model=model, cluster=cluster, queued=queued)
        elif queued:
            self._holding[key] = (was[0], max(was[1], queued))
        elif was is not None:
            del self._holding[key]
            held_s = round(self.clock() - was[0], 3)
            await self.events.emit(
                "request", "dispatched", model=model, cluster=cluster, held_s=held_s, most=was[1]
            )

    async def retried(self, request: schema.InferRequest, reason: str) -> None:
        await self.events.emit_at_most(
            _EVERY_S, f"retried:{request.model}", "request", "retried", model=request.model,
            cluster=request.cluster, request_id=request.request_id, reason=reason, attempt=request.attempt,
        )  # fmt: skip

    async def failed(self, request: schema.InferRequest, code: str, reason: str) -> None:
        user = request.identity.user if request.identity is not None else ""
        await self.events.emit_at_most(
            _EVERY_S, f"failed:{request.model}", "request", "failed", model=request.model,
            cluster=request.cluster, request_id=request.request_id, user=user, reason=reason, code=code,
        )  # fmt: skip
