"""Where a new node goes: worker slots of a cluster, and clusters that keep failing backing off."""

from __future__ import annotations

import time
from collections.abc import Callable

from shared import natsauth


class ClusterBackoff:
    """A cluster whose nodes fail to start, or whose provider fails, gets no new node for a while:
    ``base_s``, doubled with each failure in a row, at most ``max_s``. A worker of the cluster that
    comes up ready ends it."""

    def __init__(self, base_s: float, max_s: float, clock: Callable[[], float] = time.monotonic):
        self.base_s, self.max_s, self.clock = base_s, max_s, clock
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def failed(self, cluster: str) -> float:
        """Note a failure; the seconds the cluster now waits."""
        n = self._failures[cluster] = self._failures.get(cluster, 0) + 1
        wait = min(self.max_s, self.base_s * 2.0 ** (n - 1))
        self._until[cluster] = self.clock() + wait
        return wait

    def succeeded(self, cluster: str) -> None:
        self._failures.pop(cluster, None)
        self._until.pop(cluster, None)

    def waiting(self, cluster: str) -> bool:
        return self.clock() < self._until.get(cluster, 0.0)

    def failures(self, cluster: str) -> int:
        return self._failures.get(cluster, 0)


class SlotCursor:
    """Worker slots (``<cluster>-n<i>``, i below the cluster's max_nodes: the NATS users of
    shared/natsauth.py) for new nodes, taken in turn so a replacement gets fresh ids while other
    slots are free. A slot is free again only once its node is gone."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def take(self, cluster: str, size: int, held: set[str], count: int) -> list[str] | None:
        """``count`` free slots of the cluster, or None if it has fewer."""
        start = self._next.get(cluster, 0)
        found: list[str] = []
        for i in (n % size for n in range(start, start + size)):
            slot = natsauth.worker_slot(cluster, i)
            if slot not in held:
                found.append(slot)
                if len(found) == count:
                    self._next[cluster] = i + 1
                    return found
        return None
