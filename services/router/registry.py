"""The routing choice: the least-loaded ready worker of a model, with this router's own accounting.

A worker's load as this router sees it is the worker's own count (from its last heartbeat or
dispatch reply) plus the dispatches this router sent it that are not answered yet. Other routers'
dispatches show up in the worker's replies and heartbeats; a worker that is over-booked anyway
refuses, so it never runs more than its capacity.

Pure bookkeeping over the heartbeat book, so it is unit-tested without NATS.
"""

from __future__ import annotations

from shared.book import WorkerBook, WorkerEntry


def load_key(e: WorkerEntry) -> tuple[float, int, float]:
    """Lower is better: the share of slots in use, then the engine's own queue and KV cache."""
    engine = e.beat.engine
    return ((e.in_flight + e.reserved) / e.beat.capacity, engine.waiting or 0, engine.kv_cache_usage or 0.0)


class Registry(WorkerBook):
    def pick(self, model: str, exclude: frozenset[str] | set[str] = frozenset()) -> WorkerEntry | None:
        """The least-loaded ready worker of the model with a free slot, or None."""
        best: WorkerEntry | None = None
        best_key = None
        for e in self.of_model(model):
            if e.beat.state != "ready" or e.free <= 0 or e.worker_id in exclude:
                continue
            key = load_key(e)
            if best is None or key < best_key:
                best, best_key = e, key
        return best

    def dispatched(self, worker_id: str) -> None:
        """A dispatch is on its way to the worker: count it until the worker answers."""
        if (e := self.get(worker_id)) is not None:
            e.reserved += 1

    def answered(self, worker_id: str, in_flight: int | None) -> None:
        """The worker answered a dispatch, saying how many requests it now holds (None: unknown)."""
        if (e := self.get(worker_id)) is not None:
            e.reserved = max(0, e.reserved - 1)
            if in_flight is not None:
                e.in_flight = in_flight

    def refused(self, worker_id: str) -> None:
        """The worker said no (full, draining) or did not answer: pass it over until its next heartbeat."""
        if (e := self.get(worker_id)) is not None:
            e.in_flight = e.beat.capacity
