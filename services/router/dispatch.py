"""Dispatches on their way to workers: numbered, timed, and remembered after the hand-over.

Each dispatch gets a number that ends its reply subject (``<p>.v1.router.<id>.ack.<n>``), so the
worker's answer, or NATS's "no responders", finds its request without a round trip per request
being awaited anywhere. A dispatch unanswered after the timeout is given up (the caller is told
to submit again, under a new attempt number, so a late acceptance cannot make two runs count).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.router.holding import Held
from shared import schema
from shared.book import RecentIds

# How long after a worker accepted a held request its caller may still watch only the router: a
# Started comes within 0.05 s of the acceptance, so this covers slow networks many times over.
_UNSTARTED_S = 30.0
_MAX_WORKERS, _MAX_RUNS = 10_000, 100_000  # bounded, whatever the traffic


@dataclass(slots=True)
class Pending:
    held: Held
    worker_id: str
    sent: float


class Dispatches:
    def __init__(self, timeout_s: float, *, clock: Callable[[], float] = time.monotonic):
        self.timeout_s, self.clock = timeout_s, clock
        self._numbers = itertools.count()
        self._pending: dict[int, Pending] = {}  # insertion order is send order
        self._by_request: dict[str, int] = {}
        # request id -> (attempt, worker id or ""): what this router took lately. A reused id is
        # refused, and a cancel that arrives after the hand-over follows the request to its worker.
        self.recent = RecentIds(ttl_s=30.0, clock=clock)
        # Held requests a worker accepted, by worker, while their callers may still know only this
        # router (they learn of the worker from its Started, sent within moments): if the worker
        # dies first, only this router can tell them to submit again (``lost``).
        self._unstarted: dict[str, dict[str, tuple[schema.InferRequest, float]]] = {}

    def accepted(self, held: Held, worker_id: str) -> None:
        """A worker took the request; remember it for ``lost`` if its caller was told this router
        holds it (a request dispatched at once has no holder yet: its caller resubmits by itself)."""
        if held.announced and len(self._unstarted) < _MAX_WORKERS:
            runs = self._unstarted.setdefault(worker_id, {})
            if len(runs) < _MAX_RUNS:
                runs[held.request.request_id] = (held.request, self.clock())

    def lost(self, worker_id: str) -> list[schema.InferRequest]:
        """The requests handed to a worker now gone whose answers may not have begun (a caller
        bound to a started run of it ignores the Retry that follows)."""
        since = self.clock() - _UNSTARTED_S
        return [r for r, at in self._unstarted.pop(worker_id, {}).values() if at >= since]

    def forget_started(self) -> None:
        """Drop what is old enough that its caller surely heard from the worker."""
        since = self.clock() - _UNSTARTED_S
        for worker_id in list(self._unstarted):
            runs = self._unstarted[worker_id]
            for rid in [rid for rid, (_, at) in runs.items() if at < since]:
                del runs[rid]
            if not runs:
                del self._unstarted[worker_id]

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, held: Held, worker_id: str) -> int:
        n = next(self._numbers)
        self._pending[n] = Pending(held, worker_id, self.clock())
        self._by_request[held.request.request_id] = n
        return n

    def resolve(self, n: int) -> Pending | None:
        pending = self._pending.pop(n, None)
        if pending is not None and self._by_request.get(rid := pending.held.request.request_id) == n:
            del self._by_request[rid]
        return pending

    def expired(self, *, all_of_them: bool = False) -> list[Pending]:
        deadline = self.clock() - self.timeout_s
        gone = []
        for n, pending in self._pending.items():
            if pending.sent > deadline and not all_of_them:
                break
            gone.append(n)
        return [p for n in gone if (p := self.resolve(n)) is not None]

    def taken(self, request_id: str, attempt: int) -> bool:
        """This attempt of this request came here before (a caller reusing an id)."""
        seen = self.recent.get(request_id)
        return seen is not None and seen[0] == attempt

    def admitted(self, request_id: str, attempt: int) -> None:
        self.recent.add(request_id, (attempt, ""))

    def handed(self, request_id: str, attempt: int, worker_id: str) -> None:
        self.recent.add(request_id, (attempt, worker_id))

    def worker_of(self, request_id: str) -> str:
        """The worker this request was sent to, pending or accepted; empty if none."""
        if (n := self._by_request.get(request_id)) is not None:
            return self._pending[n].worker_id
        seen = self.recent.get(request_id)
        return seen[1] if seen is not None else ""
