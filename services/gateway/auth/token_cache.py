"""What a credential's check came to, kept by the credential's hash for a while, in bounded memory.

Never the credential itself: the key is its sha256. Bounded because anyone can send credentials:
a flood of random tokens must push out the oldest entries, not grow the gateway's memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class TokenCache(Generic[V]):
    """Values by key, each until its own deadline, the least recently used going first when full.
    Times are whatever clock the caller passes (``now``, ``until``), the same one throughout."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str, now: float) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        until, value = entry
        if now >= until:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: V, until: float) -> None:
        self._entries[key] = (until, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
