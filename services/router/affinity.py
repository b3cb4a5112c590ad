"""Session affinity: requests that carry the same session key go to the worker that served the
session last, while it can take them, so the engine's prefix cache (the conversation so far) is
used again instead of being computed anew on another worker.

The preference never waits: a session's worker that is full, gone, stale or in a cluster under
maintenance is passed over for the usual choice (docs/protocol.md, "How a router chooses"), and
the session moves there. Each router keeps its own map: with several routers a session may start
on another worker once per router, no more.
"""

from __future__ import annotations

from collections import OrderedDict

from services.router.registry import Registry
from shared import schema
from shared.book import WorkerEntry

MAX_SESSIONS = 100_000  # remembered per router; the least recently used go first


class Sessions:
    def __init__(self, registry: Registry, size: int = MAX_SESSIONS):
        self.registry = registry
        self.size = size
        self._last: OrderedDict[str, str] = OrderedDict()  # session -> worker id

    def preferred(self, request: schema.InferRequest) -> WorkerEntry | None:
        """The session's last worker, if it can take this request now."""
        if not request.session or (wid := self._last.get(request.session)) is None:
            return None
        return self.registry.usable(wid, request.model, request.cluster)

    def served(self, request: schema.InferRequest, worker_id: str) -> None:
        if not request.session:
            return
        self._last[request.session] = worker_id
        self._last.move_to_end(request.session)
        if len(self._last) > self.size:
            self._last.popitem(last=False)
