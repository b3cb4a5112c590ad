"""The federation as the exporter sees it on NATS, and the Prometheus collector that shows it.

Fed from three inputs (services/exporter/service.py decodes them): workers' heartbeats, routers'
Demand and beats, and operator events. Gauges are worked out at scrape time from what was heard
last, so a worker, a router or a queue that falls silent for ``missed_heartbeats`` of its own
intervals drops out of the next scrape without a timer; counters count events as they come.

Labels are bounded, whatever arrives: a model or cluster the config does not name is ``other``,
an event kind or name not in the event API is ``other``, and the tables are capped.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shared import schema
from shared.config import Config

OTHER = "other"
ANY = "any"  # Demand not pinned to a cluster
MAX_ENTRIES = 100_000  # workers, queues, routers or nodes held at most: bounded, whatever arrives

WORKER_STATES = ("starting", "loading", "ready", "draining")
NODE_STATES = ("requested", "queued", "running", "stopping")  # the live ones; failed/released end it
NODE_ENDS = frozenset({"failed", "released"})
EVENT_NAMES = {
    "node": {"requested", "queued", "running", "failed", "stopping", "released"},
    "worker": {"starting", "ready", "draining", "lost", "stopped"},
    "scale": {"up", "down"},
    "request": {"held", "dispatched", "retried", "failed"},
    "limit": {"hit"},
    "batch": {"created", "progress", "completed", "failed", "cancelled", "expired"},
    "config": {"loaded"},
}


@dataclass(slots=True)
class _Heard:
    """The last message of a party that beats, and when it came (time.monotonic())."""

    msg: object
    at: float
    interval_s: float


@dataclass(slots=True)
class _Node:
    cluster: str
    model: str
    state: str


class Federation:
    """What the exporter last heard. Every method takes decoded, already validated messages."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.missed = config.router.missed_heartbeats
        self.models = frozenset(m.id for m in config.models)
        self.clusters = frozenset(c.name for c in config.clusters)
        self.workers: dict[str, _Heard] = {}  # worker id -> its Heartbeat
        self.queues: dict[tuple[str, str, str], _Heard] = {}  # (router, model, cluster) -> Demand
        self.routers: dict[str, _Heard] = {}  # router id -> its RouterBeat
        self.nodes: dict[str, _Node] = {}  # node id -> its latest live state
        self.events: Tally[tuple[str, str]] = Tally()  # (kind, name) -> events
        self.scaling: Tally[tuple[str, str]] = Tally()  # (model, direction) -> scaling decisions
        self.refusals: Tally[str] = Tally()  # model -> limit refusals the gateways reported
        self.lost_workers: Tally[tuple[str, str]] = Tally()  # (model, cluster) -> workers lost
        # While the stored node events are read (``replay``), the nodes live events spoke of:
        # newer than anything stored, so the stored ones do not overwrite them.
        self.replaying = False
        self._live_nodes: set[str] = set()

    def model(self, name: str) -> str:
        return name if name in self.models else OTHER

    def cluster(self, name: str) -> str:
        return name if name in self.clusters else OTHER

    # --- input ---------------------------------------------------------------------------------

    def heartbeat(self, beat: schema.Heartbeat) -> None:
        if beat.state == "stopped":
            self.workers.pop(beat.worker_id, None)
        elif beat.worker_id in self.workers or len(self.workers) < MAX_ENTRIES:
            self.workers[beat.worker_id] = _Heard(beat, self.clock(), beat.interval_s)

    def demand(self, demand: schema.Demand) -> None:
        key = (demand.router_id, demand.model, demand.cluster)
        if key in self.queues or len(self.queues) < MAX_ENTRIES:
            self.queues[key] = _Heard(demand, self.clock(), demand.interval_s)

    def router_beat(self, beat: schema.RouterBeat) -> None:
        if beat.router_id in self.routers or len(self.routers) < MAX_ENTRIES:
            self.routers[beat.router_id] = _Heard(beat, self.clock(), beat.interval_s)

    def event(self, event: schema.Event) -> None:
        names = EVENT_NAMES.get(event.kind)
        kind = event.kind if names is not None else OTHER
        name = event.name if names is not None and event.name in names else OTHER
        self.events[(kind, name)] += 1
        match (kind, name):
            case ("node", _) if event.node_id:
                if self.replaying and len(self._live_nodes) < MAX_ENTRIES:
                    self._live_nodes.add(event.node_id)
                self._node(event.node_id, name, event)
            case ("scale", direction):
                self.scaling[(self.model(event.model), direction)] += 1
            case ("limit", "hit"):
                # A gateway sends at most one a minute per user and model, and says in the next
                # one how many it left out.
                left_out = event.data.get("left_out", 0)
                extra = left_out if type(left_out) is int and 0 <= left_out <= 1_000_000_000 else 0
                self.refusals[self.model(event.model)] += 1 + extra
            case ("worker", "lost" | "stopped"):
                if name == "lost":
                    self.lost_workers[(self.model(event.model), self.cluster(event.cluster))] += 1
                self.workers.pop(event.worker_id, None)  # its last beats may still say ready

    def replay(self, event: schema.Event) -> None:
        """A node event from the event stream, older than the live ones: the nodes that were up
        before this exporter started. Counters count live events only."""
        if event.kind == "node" and event.node_id and event.node_id not in self._live_nodes:
            self._node(event.node_id, event.name if event.name in EVENT_NAMES["node"] else OTHER, event)

    def replayed(self) -> None:
        self.replaying = False
        self._live_nodes.clear()

    def _node(self, node_id: str, name: str, event: schema.Event) -> None:
        if name in NODE_ENDS or name == OTHER:
            self.nodes.pop(node_id, None)
        elif node_id in self.nodes or len(self.nodes) < MAX_ENTRIES:
            self.nodes[node_id] = _Node(event.cluster, event.model, name)

    # --- what is alive now ---------------------------------------------------------------------

    def _alive(self, table: dict) -> list:
        """The entries heard within ``missed`` of their intervals; the others are forgotten."""
        now = self.clock()
        gone = [k for k, h in table.items() if now - h.at > self.missed * h.interval_s]
        for key in gone:
            del table[key]
        return [h.msg for h in table.values()]


class FederationCollector(Collector):
    """Prometheus's view of a Federation, built at each scrape (docs/metrics.md lists it)."""

    def __init__(self, federation: Federation):
        self.f = federation

    def collect(self):
        f = self.f
        workers = GaugeMetricFamily(
            "first_workers", "Workers by model, cluster and state, from their heartbeats.",
            labels=("model", "cluster", "state"),
        )  # fmt: skip
        in_use = GaugeMetricFamily(
            "first_worker_slots_in_use", "Requests the workers run now (their heartbeats' in_flight).",
            labels=("model", "cluster"),
        )  # fmt: skip
        slots = GaugeMetricFamily(
            "first_worker_slots", "Requests the workers can run at once (their capacity), draining ones included.",
            labels=("model", "cluster"),
        )  # fmt: skip
        by_state: Tally[tuple[str, str, str]] = Tally()
        used: Tally[tuple[str, str]] = Tally()
        capacity: Tally[tuple[str, str]] = Tally()
        for beat in f._alive(f.workers):
            pair = (f.model(beat.model), f.cluster(beat.cluster))
            by_state[(*pair, beat.state)] += 1
            used[pair] += beat.in_flight
            capacity[pair] += beat.capacity
        for pair in {(m, c) for m, c, _ in by_state}:
            for state in WORKER_STATES:  # every state of a model's cluster, 0 included
                workers.add_metric((*pair, state), by_state[(*pair, state)])
        for pair in capacity:
            in_use.add_metric(pair, used[pair])
            slots.add_metric(pair, capacity[pair])
        yield from (workers, in_use, slots)

        depth = GaugeMetricFamily(
            "first_queue_depth", "Requests the routers hold for want of a worker (summed over routers).",
            labels=("model", "cluster"),
        )  # fmt: skip
        oldest = GaugeMetricFamily(
            "first_queue_oldest_wait_seconds", "How long the oldest held request has waited (over routers).",
            labels=("model", "cluster"),
        )  # fmt: skip
        queued: Tally[tuple[str, str]] = Tally()
        waited: dict[tuple[str, str], float] = {}
        for d in f._alive(f.queues):
            key = (f.model(d.model), f.cluster(d.cluster) if d.cluster else ANY)
            queued[key] += d.queued
            waited[key] = max(waited.get(key, 0.0), d.oldest_wait_s if d.queued else 0.0)
        for key, n in queued.items():
            depth.add_metric(key, n)
            oldest.add_metric(key, waited[key])
        yield from (depth, oldest)

        routers = GaugeMetricFamily("first_routers", "Routers alive (their beats), and the requests they hold.",
                                    labels=("what",))  # fmt: skip
        alive = f._alive(f.routers)
        routers.add_metric(("routers",), len(alive))
        routers.add_metric(("held",), sum(b.held for b in alive))
        yield routers

        nodes = GaugeMetricFamily(
            "first_nodes", "Nodes by cluster, model and state, from the scaler's node events.",
            labels=("cluster", "model", "state"),
        )  # fmt: skip
        node_counts = Tally((f.cluster(n.cluster), f.model(n.model), n.state) for n in f.nodes.values())
        for key, n in node_counts.items():
            nodes.add_metric(key, n)
        yield nodes

        yield _counter("first_events", "Operator events by kind and name.", ("kind", "name"), f.events)
        yield _counter("first_scaling_actions", "The scaler's decisions to start (up) or release (down) nodes.",
                       ("model", "direction"), f.scaling)  # fmt: skip
        yield _counter("first_limit_refusals", "Requests the gateways refused over a limit (limit.hit events).",
                       ("model",), {(m,): n for m, n in f.refusals.items()})  # fmt: skip
        yield _counter("first_workers_lost", "Workers whose heartbeats stopped (worker.lost events).",
                       ("model", "cluster"), f.lost_workers)  # fmt: skip


def _counter(name: str, documentation: str, labels: tuple[str, ...], values: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, n in values.items():
        family.add_metric(key, n)
    return family
