"""A model's live status as users see it in /v1/models: live, starting, queued or offline.

Built from this router's registry and queues, other routers' Demand and the scaler's node events.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared import config as cfg
from shared import schema
from shared.book import DemandBook, WorkerBook


class ClusterView:
    def __init__(
        self,
        config: cfg.Config,
        registry: WorkerBook,
        *,
        start_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config, self.registry, self.clock = config, registry, clock
        self.start_timeout_s = start_timeout_s
        self.demand = DemandBook(
            clock, max_per_router=config.router.max_queue
        )  # other routers' held requests
        self._nodes: dict[str, tuple[schema.Event, float]] = {}  # node id -> (event, seen)

    def observe_node(self, event: schema.Event) -> None:
        if not event.node_id or len(self._nodes) >= 100_000:  # bounded, whatever the input
            self._nodes.pop(event.node_id, None)
        elif event.name in ("requested", "queued", "running"):
            self._nodes[event.node_id] = (event, self.clock())
        else:
            self._nodes.pop(event.node_id, None)

    def nodes_starting(self, model: str) -> int:
        """Nodes the scaler asked for whose worker has not said it is ready yet."""
        now = self.clock()
        ready_nodes = {
            e.beat.node_id for e in self.registry.workers(model) if e.beat.node_id and e.beat.state == "ready"
        }
        return sum(
            1
            for node_id, (event, seen) in self._nodes.items()
            if event.model == model and node_id not in ready_nodes and now - seen < self.start_timeout_s
        )

    def models(self, own_queued: dict[str, int]) -> list[schema.ModelStatus]:
        out = []
        for model in self.config.models:
            workers = self.registry.workers(model.id)
            queued = own_queued.get(model.id, 0) + self.demand.queued(model.id)
            starting = self.nodes_starting(model.id)
            if any(e.beat.state == "ready" for e in workers):
                state = "live"
            elif starting or any(e.beat.state in ("starting", "loading") for e in workers):
                state = "starting"
            elif queued:
                state = "queued"
            else:
                state = "offline"
            out.append(
                schema.ModelStatus(
                    id=model.id,
                    state=state,
                    clusters=self.config.clusters_for(model),
                    queued=queued,
                    nodes_starting=starting,
                    workers=[
                        schema.WorkerInfo(
                            e.worker_id, e.beat.cluster, e.beat.state, e.beat.capacity, e.beat.in_flight
                        )
                        for e in workers
                    ],
                )
            )
        return out
