"""The routing choice: the least-loaded ready worker of a model, with this router's own accounting.

Pure bookkeeping over the heartbeat book, so it is unit-tested without NATS.
"""

from __future__ import annotations

from shared.book import WorkerBook, WorkerEntry


def load_key(e: WorkerEntry) -> tuple[float, int, float]:
    """Lower is better: the share of slots in use, then the engine's own queue and KV cache."""
    engine = e.beat.engine
    return (e.in_flight / e.beat.capacity, engine.waiting or 0, engine.kv_cache_usage or 0.0)


class Registry(WorkerBook):
    def pick(self, model: str, exclude: frozenset[str] | set[str] = frozenset()) -> WorkerEntry | None:
        """The least-loaded ready worker of the model with a free slot, or None."""
        best: WorkerEntry | None = None
        for e in self.workers(model):
            if e.beat.state != "ready" or e.free <= 0 or e.worker_id in exclude:
                continue
            if best is None or load_key(e) < load_key(best):
                best = e
        return best

    def dispatched(self, worker_id: str) -> None:
        if (e := self.get(worker_id)) is not None:
            e.in_flight += 1

    def refused(self, worker_id: str) -> None:
        """The worker said no (full, draining) or did not answer: pass it over until its next heartbeat."""
        if (e := self.get(worker_id)) is not None:
            e.in_flight = e.beat.capacity
