"""Counts per key over a sliding time window, kept in fixed slots: O(1) to add and to read.

A window of ``span_s`` in ``slots`` slots keeps one more slot than that, so a count always covers
the whole span back from now, plus at most one slot: something counted leaves the count between
``span_s`` and ``span_s + span_s / slots`` after it was added. "Allow iff count < limit" then
never lets more than the limit into any stretch of ``span_s``; the price is that room comes back
up to one slot late. Keys whose counts have all expired are forgotten by ``sweep``.
"""

from __future__ import annotations

from collections.abc import Hashable


class _Slots:
    __slots__ = ("counts", "last", "stamp", "total")

    def __init__(self, size: int, index: int):
        self.counts = [0] * size
        self.stamp = index  # the slot index the counts were last brought up to
        self.last = index  # the slot index of the last add
        self.total = 0


class Window:
    def __init__(self, span_s: float, slots: int, *, max_keys: int = 100_000):
        self.span_s = span_s
        self._per_s = slots / span_s  # slots per second: index = now * this (no 0.1-sized division)
        self.max_keys = max_keys
        self._size = slots + 1
        self._keys: dict[Hashable, _Slots] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def _index(self, now: float) -> int:
        return int(now * self._per_s)

    def _leaves(self, index: int, now: float) -> float:
        """Seconds until slot ``index`` leaves the window; a hair more, so that waiting exactly
        this long finds it gone despite float rounding."""
        return max(0.0, (index + self._size) / self._per_s - now + 1e-9)

    def _advance(self, c: _Slots, index: int) -> None:
        """Drop the slots that left the window since ``c`` was last brought up to date."""
        gap = index - c.stamp
        if gap <= 0:
            return
        if gap >= self._size:
            if c.total:
                c.counts = [0] * self._size
                c.total = 0
        else:
            counts, size = c.counts, self._size
            for i in range(c.stamp + 1, index + 1):
                j = i % size
                if counts[j]:
                    c.total -= counts[j]
                    counts[j] = 0
        c.stamp = index

    def add(self, key: Hashable, n: int, now: float, *, grow: bool = True) -> bool:
        """Count ``n`` for ``key`` now. ``grow=False`` (input from the network): a new key is not
        taken while the window already holds ``max_keys`` keys; False then."""
        index = self._index(now)
        c = self._keys.get(key)
        if c is None:
            if not grow and len(self._keys) >= self.max_keys:
                return False
            c = self._keys[key] = _Slots(self._size, index)
        else:
            self._advance(c, index)
        c.counts[index % self._size] += n
        c.total += n
        c.last = index
        return True

    def count(self, key: Hashable, now: float) -> int:
        c = self._keys.get(key)
        if c is None:
            return 0
        self._advance(c, self._index(now))
        return c.total

    def room_in(self, key: Hashable, now: float, limit: float) -> float:
        """Seconds until the count is below ``limit`` (> 0) again; 0.0 when it already is."""
        c = self._keys.get(key)
        if c is None:
            return 0.0
        index = self._index(now)
        self._advance(c, index)
        total, size = c.total, self._size
        if total < limit:
            return 0.0
        for i in range(index - size + 1, index + 1):  # oldest slot first
            total -= c.counts[i % size]
            if total < limit:
                return self._leaves(i, now)
        return self._leaves(index, now)  # unreachable for limit > 0: the total reaches 0

    def reset_in(self, key: Hashable, now: float) -> float:
        """Seconds until everything counted for ``key`` has left the window."""
        c = self._keys.get(key)
        if c is None:
            return 0.0
        self._advance(c, self._index(now))
        if not c.total:
            return 0.0
        return self._leaves(c.last, now)

    def sweep(self, now: float) -> int:
        """Forget the keys with nothing left in the window; how many were forgotten."""
        index = self._index(now)
        idle = [k for k, c in self._keys.items() if c.last + self._size <= index]
        for key in idle:
            del self._keys[key]
        return len(idle)
