"""The scaling decision for one model, as a pure function of what the scaler sees.

- Keep ``min_hot`` workers up even without demand.
- Want enough workers for the requests in flight plus those queued, never beyond ``max_workers``.
- Count nodes already asked for and not yet serving: demand that a starting node will meet does not
  start a second one.
- Release workers idle longer than ``idle_s`` down to what is wanted (never below ``min_hot``),
  never while requests wait, and only nodes this scaler started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shared import config as cfg
from shared import schema


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    worker_id: str
    node_id: str  # empty: not a node this scaler started
    state: schema.WorkerState
    in_flight: int
    idle_s: float


@dataclass(frozen=True, slots=True)
class ModelView:
    queued: int
    workers: list[WorkerLoad] = field(default_factory=list)
    pending_nodes: int = 0  # asked for, no heartbeat yet


@dataclass(frozen=True, slots=True)
class Decision:
    start: int = 0
    stop: tuple[str, ...] = ()  # node ids
    desired: int = 0


def decide(policy: cfg.ScalingPolicy, capacity: int, view: ModelView) -> Decision:
    serving = [w for w in view.workers if w.state in ("starting", "loading", "ready")]
    active = len(serving) + view.pending_nodes
    load = sum(w.in_flight for w in serving) + view.queued
    desired = min(policy.max_workers, max(policy.min_hot, math.ceil(load / capacity)))
    if active < desired:
        return Decision(start=desired - active, desired=desired)
    if active == desired or view.queued or view.pending_nodes:
        return Decision(desired=desired)
    idle = sorted(
        (
            w
            for w in serving
            if w.node_id and w.state == "ready" and w.in_flight == 0 and w.idle_s >= policy.idle_s
        ),
        key=lambda w: -w.idle_s,
    )
    surplus = active - desired
    return Decision(stop=tuple(w.node_id for w in idle[:surplus]), desired=desired)


def share_rotating(wants: dict[str, tuple[int, float]], free: int) -> dict[str, int]:
    """The rotating-node budget (``scaler.rotating_nodes``) for this tick: ``wants`` maps each model
    to (rotating nodes it would start, its demand: queued plus in flight). The models with the
    most demand get theirs first, until ``free`` nodes are given out."""
    granted: dict[str, int] = {}
    for model, (nodes, _demand) in sorted(wants.items(), key=lambda item: (-item[1][1], item[0])):
        granted[model] = give = min(nodes, max(0, free))
        free -= give
    return granted


def node_budget(
    plans: list[tuple[cfg.ModelConfig, ModelView, Decision]], live: dict[str, int], rotating: int | None
) -> dict[str, int]:
    """Nodes each model may start this tick (model -> nodes) under ``scaler.rotating_nodes``
    (``rotating``; None: no budget, an empty answer): what min_hot needs always (the always-hot
    models), and rotating nodes, beyond min_hot over all models, to the models with the most
    demand. ``live``: the nodes each model holds, not on their way out."""
    if rotating is None:
        return {}
    hot, wants, in_use = {}, {}, 0
    for model, view, decision in plans:
        k = model.scaling.workers_per_node
        hot_nodes = math.ceil(model.scaling.min_hot / k)
        held = live.get(model.id, 0)
        in_use += max(0, held - hot_nodes)
        starts = math.ceil(decision.start / k)
        hot[model.id] = min(starts, max(0, hot_nodes - held))
        demand = view.queued + sum(w.in_flight for w in view.workers)
        wants[model.id] = (starts - hot[model.id], demand)
    granted = share_rotating(wants, rotating - in_use)
    return {m: hot[m] + granted.get(m, 0) for m in hot}
