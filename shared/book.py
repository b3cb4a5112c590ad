"""What the control plane has heard lately: workers from heartbeats, queued requests from Demand.

Routers and the scaler both keep these books. Entries expire when their senders fall silent,
so a killed worker or router drops out without anybody having to say so. The clock is
injectable for unit tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shared import schema


@dataclass(slots=True)
class WorkerEntry:
    beat: schema.Heartbeat
    last_seen: float
    in_flight: int  # the worker's own count: its last heartbeat or dispatch reply
    reserved: int = 0  # dispatches this router sent that the worker has not answered yet

    @property
    def worker_id(self) -> str:
        return self.beat.worker_id

    @property
    def free(self) -> int:
        return self.beat.capacity - self.in_flight - self.reserved


class WorkerBook:
    """Workers by id and by model. Expiry runs on a timer (``expire``), not on every lookup."""

    def __init__(
        self,
        missed_heartbeats: int = 3,
        clock: Callable[[], float] = time.monotonic,
        *,
        keep_lost: bool = False,
    ):
        self.missed_heartbeats = missed_heartbeats
        self.clock = clock
        # Workers that fell silent, until their keeper takes them (``take_lost``): who reports them.
        self._lost: list[WorkerEntry] | None = [] if keep_lost else None
        self._workers: dict[str, WorkerEntry] = {}
        self._by_model: dict[str, dict[str, WorkerEntry]] = {}

    def observe(self, beat: schema.Heartbeat) -> WorkerEntry | None:
        """Record a heartbeat; a worker that says it stopped is forgotten at once (returns None)."""
        if beat.state == "stopped":
            self.forget(beat.worker_id)
            return None
        entry = self._workers.get(beat.worker_id)
        if entry is not None and entry.beat.model != beat.model:  # a worker id reused for another model
            self.forget(beat.worker_id)
            entry = None
        if entry is None:
            entry = self._workers[beat.worker_id] = WorkerEntry(beat, self.clock(), beat.in_flight)
            self._by_model.setdefault(beat.model, {})[beat.worker_id] = entry
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
            if self._lost is not None and len(self._lost) < 10_000:
                self._lost.append(self._workers[wid])
            self.forget(wid)
        return gone

    def take_lost(self) -> list[WorkerEntry]:
        """The workers expired since the last call (with ``keep_lost``)."""
        self.expire()
        lost, self._lost = self._lost or [], [] if self._lost is not None else None
        return lost

    def forget(self, worker_id: str) -> None:
        entry = self._workers.pop(worker_id, None)
        if entry is not None:
            model = self._by_model.get(entry.beat.model)
            if model is not None:
                model.pop(worker_id, None)
                if not model:
                    del self._by_model[entry.beat.model]

    def get(self, worker_id: str) -> WorkerEntry | None:
        return self._workers.get(worker_id)

    def of_model(self, model: str) -> Iterable[WorkerEntry]:
        """The model's workers as last heard (call ``expire`` on a timer to drop the silent)."""
        return self._by_model.get(model, {}).values()

    def workers(self, model: str | None = None) -> list[WorkerEntry]:
        self.expire()
        if model is None:
            return list(self._workers.values())
        return list(self.of_model(model))


class DemandBook:
    """Requests held per model, summed over the routers that reported them recently.

    A report counts for three of its intervals, at most ``MAX_TRUST_S``, and for at most
    ``max_per_router`` requests: a sender claiming a huge queue for hours cannot close admission.
    """

    MAX_TRUST_S = 15.0

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, max_per_router: int | None = None):
        self.clock = clock
        self.max_per_router = max_per_router
        # (router, model, cluster) -> (its last report, trusted until); cluster "": unpinned requests
        self._seen: dict[tuple[str, str, str], tuple[schema.Demand, float]] = {}

    def observe(self, demand: schema.Demand) -> None:
        if self.max_per_router is not None and demand.queued > self.max_per_router:
            demand.queued = self.max_per_router
        key = (demand.router_id, demand.model, demand.cluster)
        if len(self._seen) > 10_000 and key not in self._seen:
            self._forget_expired()
        trust = min(3 * demand.interval_s, self.MAX_TRUST_S)
        self._seen[key] = (demand, self.clock() + trust)

    def _forget_expired(self) -> None:
        now = self.clock()
        self._seen = {k: v for k, v in self._seen.items() if v[1] > now}

    def queued(self, model: str, *, exclude_router: str = "", cluster: str | None = None) -> int:
        """Requests held for the model: all of them, or (``cluster``) only those pinned to that
        cluster (``""``: only those that any cluster may serve)."""
        now = self.clock()
        return sum(
            d.queued
            for (router, m, c), (d, expires) in self._seen.items()
            if m == model and expires > now and router != exclude_router and cluster in (None, c)
        )

    def pinned(self, model: str) -> dict[str, int]:
        """Requests held for the model pinned to a cluster, by cluster (those with any)."""
        now = self.clock()
        out: dict[str, int] = {}
        for (_, m, c), (d, expires) in self._seen.items():
            if m == model and c and expires > now and d.queued:
                out[c] = out.get(c, 0) + d.queued
        return out


class RecentIds:
    """Ids seen in the last ``ttl_s`` seconds, each with a value (``True`` unless given).

    Routers and workers remember cancelled requests here (a cancel can overtake its request:
    the caller leaves while a router hands it to a worker), the attempts they took (so a reused
    id gets a clear refusal) and where they sent each request (so a cancel can follow it).
    """

    def __init__(self, ttl_s: float = 120.0, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.clock = ttl_s, clock
        self._items: dict[str, tuple[float, object]] = {}  # insertion order is expiry order

    def add(self, item: str, value: object = True) -> None:
        now = self.clock()
        self._items.pop(item, None)
        self._items[item] = (now + self.ttl_s, value)
        while self._items:
            oldest, (expires, _) = next(iter(self._items.items()))
            if expires > now:
                break
            del self._items[oldest]

    def get(self, item: str) -> object | None:
        found = self._items.get(item)
        return found[1] if found is not None and found[0] > self.clock() else None

    def __contains__(self, item: str) -> bool:
        return self.get(item) is not None
