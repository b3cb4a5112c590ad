"""What the control plane has heard lately: workers from heartbeats, queued requests from Demand.

Routers and the scaler both keep these books. Entries expire when their senders fall silent,
so a killed worker or router drops out without anybody having to say so. The clock is
injectable for unit tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from shared import schema


@dataclass(slots=True)
class WorkerEntry:
    beat: schema.Heartbeat
    last_seen: float
    in_flight: int  # the last heartbeat's figure; routers add what they sent since

    @property
    def worker_id(self) -> str:
        return self.beat.worker_id

    @property
    def free(self) -> int:
        return self.beat.capacity - self.in_flight


class WorkerBook:
    def __init__(self, missed_heartbeats: int = 3, clock: Callable[[], float] = time.monotonic):
        self.missed_heartbeats = missed_heartbeats
        self.clock = clock
        self._workers: dict[str, WorkerEntry] = {}

    def observe(self, beat: schema.Heartbeat) -> WorkerEntry | None:
        """Record a heartbeat; a worker that says it stopped is forgotten at once (returns None)."""
        if beat.state == "stopped":
            self._workers.pop(beat.worker_id, None)
            return None
        entry = self._workers.get(beat.worker_id)
        if entry is None:
            entry = self._workers[beat.worker_id] = WorkerEntry(beat, self.clock(), beat.in_flight)
        entry.beat, entry.last_seen, entry.in_flight = beat, self.clock(), beat.in_flight
        return entry

    def expire(self) -> list[str]:
        """Forget workers silent for ``missed_heartbeats`` of their intervals; return their ids."""
        now = self.clock()
        gone = [
            wid
            for wid, e in self._workers.items()
            if now - e.last_seen > e.beat.interval_s * self.missed_heartbeats
        ]
        for wid in gone:
            del self._workers[wid]
        return gone

    def forget(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def get(self, worker_id: str) -> WorkerEntry | None:
        return self._workers.get(worker_id)

    def workers(self, model: str | None = None) -> list[WorkerEntry]:
        self.expire()
        return [e for e in self._workers.values() if model is None or e.beat.model == model]


class DemandBook:
    """Requests held per model, summed over the routers that reported them recently."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[schema.Demand, float]] = {}

    def observe(self, demand: schema.Demand) -> None:
        self._seen[(demand.router_id, demand.model)] = (demand, self.clock() + 3 * demand.interval_s)

    def queued(self, model: str, *, exclude_router: str = "") -> int:
        now = self.clock()
        return sum(
            d.queued
            for (router, m), (d, expires) in self._seen.items()
            if m == model and expires > now and router != exclude_router
        )


class RecentIds:
    """Ids seen in the last ``ttl_s`` seconds: the requests cancelled lately.

    A cancel can overtake its request (the caller leaves while a router is handing it to a
    worker); routers and workers remember it, so the request is dropped when it arrives.
    """

    def __init__(self, ttl_s: float = 120.0, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.clock = ttl_s, clock
        self._expires: dict[str, float] = {}  # insertion order is expiry order

    def add(self, item: str) -> None:
        now = self.clock()
        self._expires.pop(item, None)
        self._expires[item] = now + self.ttl_s
        while self._expires:
            oldest, expires = next(iter(self._expires.items()))
            if expires > now:
                break
            del self._expires[oldest]

    def __contains__(self, item: str) -> bool:
        expires = self._expires.get(item)
        return expires is not None and expires > self.clock()
