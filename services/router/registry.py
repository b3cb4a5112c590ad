"""The routing choice: a cluster, then the least-loaded ready worker in it, from an index kept per event.

A worker's load as this router sees it is the worker's own count (from its last heartbeat or
dispatch reply) plus the dispatches this router sent it that are not answered yet. Other routers'
dispatches show up in the worker's replies and heartbeats; a worker that is over-booked anyway
refuses, so it never runs more than its capacity.

The choice (docs/protocol.md, "How a router chooses") runs on every request, so it must not scan
the workers: each event that changes a worker (heartbeat, dispatch, answer, refusal, removal, its
heartbeat going stale) updates, per model and cluster, a heap of the workers that have a free slot
and the cluster's free and total slots. Full workers are not in any heap and cost nothing at choice
time; a pick looks at each cluster's totals and one heap top. Heaps drop outdated items lazily
(each item carries the version of its worker) and are rebuilt when mostly outdated.

Pure bookkeeping over the heartbeat book, so it is unit-tested without NATS.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from shared import schema
from shared.book import WorkerBook, WorkerEntry

# A heartbeat older than this many of its intervals is stale: the worker may be gone (its cluster
# cut off), but is not forgotten until ``missed_heartbeats`` intervals pass.
STALE_AFTER_INTERVALS = 1.5

# Tiers, best first: (in maintenance, stale). A pick takes the best tier that has a free worker.
_TIERS = ((False, False), (False, True), (True, False), (True, True))


def load_key(e: WorkerEntry) -> tuple[float, int, float]:
    """Lower is better: the share of slots in use, then the engine's own queue and KV cache."""
    engine = e.beat.engine
    return ((e.in_flight + e.reserved) / e.beat.capacity, engine.waiting or 0, engine.kv_cache_usage or 0.0)


@dataclass(slots=True)
class _Group:
    """One model's workers in one cluster, split by freshness (index 0: fresh, 1: stale)."""

    cluster: str
    heaps: tuple[list, list] = field(default_factory=lambda: ([], []))
    live: list[int] = field(default_factory=lambda: [0, 0])  # workers whose current item is in the heap
    free: list[int] = field(default_factory=lambda: [0, 0])  # free slots of ready workers
    slots: list[int] = field(default_factory=lambda: [0, 0])  # capacity of ready workers
    waiting: list[int] = field(default_factory=lambda: [0, 0])  # their engines' own queues


@dataclass(slots=True)
class _Place:
    """Where a worker stands in the index: what it added to its group, and its current version."""

    entry: WorkerEntry
    version: int = 0
    beats: int = 0  # heartbeats seen: a stale-deadline item from an older beat is outdated
    stale: bool = False
    group: _Group | None = None  # the group its contribution below went to
    tier: int = 0
    free: int = 0
    slots: int = 0
    waiting: int = 0
    in_heap: bool = False


def cluster_score(group: _Group, tier: int) -> tuple[float, int, str]:
    """Lower is better: the cluster's load (its ready slots in use, plus the requests its engines
    report waiting in their own queues, as a share of its slots), then more free slots, by name."""
    slots, free = group.slots[tier], group.free[tier]
    return ((slots - free + group.waiting[tier]) / slots, -free, group.cluster)


class Registry(WorkerBook):
    """The heartbeat book plus this router's accounting and the index the choice reads."""

    def __init__(self, missed_heartbeats: int = 3, clock: Callable[[], float] = time.monotonic):
        super().__init__(missed_heartbeats, clock)
        self._places: dict[str, _Place] = {}
        self._groups: dict[str, dict[str, _Group]] = {}  # model -> cluster -> group
        self._stale_at: list[tuple[float, int, int, _Place]] = []  # (deadline, seq, beats, place)
        self._seq = itertools.count()
        self._versions = itertools.count(1)
        # Clusters under maintenance: chosen only when no other cluster has a free worker. The
        # router fills it from the maintenance bucket (shared/clusterstate.py).
        self.maintenance: set[str] = set()

    # --- the choice ----------------------------------------------------------------------------

    def pick(
        self,
        model: str,
        exclude: frozenset[str] | set[str] = frozenset(),
        *,
        cluster: str = "",
        clusters: Collection[str] = (),
    ) -> WorkerEntry | None:
        """The least-loaded ready worker with a free slot in the best cluster of the best tier, or
        None. ``cluster``: only that cluster's workers (a pinned request); ``clusters``: only
        those clusters' (the ones its caller may use)."""
        groups = self._groups.get(model)
        if not groups:
            return None
        if cluster:
            if (only := groups.get(cluster)) is None:
                return None
            groups = {cluster: only}
        elif clusters:
            groups = {c: g for c, g in groups.items() if c in clusters}
        self._mark_stale()
        for maintenance, stale in _TIERS:
            tier = int(stale)
            ranked = sorted(
                (cluster_score(g, tier), g)
                for g in groups.values()
                if g.free[tier] > 0 and (g.cluster in self.maintenance) == maintenance
            )
            for _, group in ranked:
                if (entry := self._top(group.heaps[tier], exclude)) is not None:
                    return entry
        return None

    def usable(self, worker_id: str, model: str, cluster: str = "") -> WorkerEntry | None:
        """This worker, if it can take a request for the model now: ready with a free slot, a fresh
        heartbeat, in service (and in ``cluster``, if given). Session affinity asks this."""
        e, place = self.get(worker_id), self._places.get(worker_id)
        if e is None or place is None or e.beat.model != model or e.beat.state != "ready" or e.free <= 0:
            return None
        self._mark_stale()
        if place.stale or e.beat.cluster in self.maintenance or (cluster and e.beat.cluster != cluster):
            return None
        return e

    def _top(self, heap: list, exclude: Iterable[str]) -> WorkerEntry | None:
        """The best current item of a heap that is not excluded; outdated items are dropped."""
        passed = []
        found = None
        while heap:
            _, wid, version, place = heap[0]
            if version != place.version:
                heapq.heappop(heap)
            elif wid in exclude:
                passed.append(heapq.heappop(heap))
            else:
                found = place.entry
                break
        for item in passed:
            heapq.heappush(heap, item)
        return found

    # --- events --------------------------------------------------------------------------------

    def observe(self, beat: schema.Heartbeat) -> WorkerEntry | None:
        entry = super().observe(beat)
        if entry is None:
            return None
        place = self._places.get(beat.worker_id)
        if place is None or place.entry is not entry:
            place = self._places[beat.worker_id] = _Place(entry)
        place.beats += 1
        place.stale = False
        deadline = entry.last_seen + STALE_AFTER_INTERVALS * beat.interval_s
        heapq.heappush(self._stale_at, (deadline, next(self._seq), place.beats, place))
        self._reindex(place)
        return entry

    def forget(self, worker_id: str) -> None:
        super().forget(worker_id)
        if (place := self._places.pop(worker_id, None)) is not None:
            self._withdraw(place)
            place.version = next(self._versions)

    def expire(self) -> list[str]:
        gone = super().expire()
        self._mark_stale()
        return gone

    def dispatched(self, worker_id: str) -> None:
        """A dispatch is on its way to the worker: count it until the worker answers."""
        if (e := self.get(worker_id)) is not None:
            e.reserved += 1
            self._reindex(self._places[worker_id])

    def answered(self, worker_id: str, in_flight: int | None) -> None:
        """The worker answered a dispatch, saying how many requests it now holds (None: unknown)."""
        if (e := self.get(worker_id)) is not None:
            e.reserved = max(0, e.reserved - 1)
            if in_flight is not None:
                e.in_flight = in_flight
            self._reindex(self._places[worker_id])

    def refused(self, worker_id: str) -> None:
        """The worker said no (full, draining) or did not answer: pass it over until its next heartbeat."""
        if (e := self.get(worker_id)) is not None:
            e.in_flight = e.beat.capacity
            self._reindex(self._places[worker_id])

    # --- the index -----------------------------------------------------------------------------

    def _mark_stale(self) -> None:
        """Move workers whose heartbeat deadline passed to their cluster's stale side."""
        now, due = self.clock(), self._stale_at
        while due and due[0][0] < now:
            _, _, beats, place = heapq.heappop(due)
            if beats == place.beats and not place.stale and self._places.get(place.entry.worker_id) is place:
                place.stale = True
                self._reindex(place)

    def _withdraw(self, place: _Place) -> None:
        if (group := place.group) is not None:
            group.free[place.tier] -= place.free
            group.slots[place.tier] -= place.slots
            group.waiting[place.tier] -= place.waiting
            if place.in_heap:
                group.live[place.tier] -= 1
                if not group.live[place.tier]:  # nothing current left: drop the outdated items at once
                    group.heaps[place.tier].clear()
            place.group, place.in_heap = None, False

    def _reindex(self, place: _Place) -> None:
        """Replace what the worker contributes to the index by what its entry says now."""
        self._withdraw(place)
        place.version = next(self._versions)  # unique across workers: heap items never tie on it
        e = place.entry
        if e.beat.state != "ready":
            return
        groups = self._groups.setdefault(e.beat.model, {})
        group = groups.get(e.beat.cluster)
        if group is None:
            group = groups[e.beat.cluster] = _Group(e.beat.cluster)
        tier = int(place.stale)
        free = max(0, e.free)
        place.group, place.tier, place.free, place.slots = group, tier, free, e.beat.capacity
        place.waiting = e.beat.engine.waiting or 0
        group.free[tier] += free
        group.slots[tier] += e.beat.capacity
        group.waiting[tier] += place.waiting
        if free:
            heap = group.heaps[tier]
            heapq.heappush(heap, (load_key(e), e.worker_id, place.version, place))
            place.in_heap = True
            group.live[tier] += 1
            if len(heap) > 2 * group.live[tier] + 64:  # mostly outdated items: rebuild
                heap[:] = [item for item in heap if item[2] == item[3].version]
                heapq.heapify(heap)
