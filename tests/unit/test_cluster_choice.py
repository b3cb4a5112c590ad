"""The router's cluster-aware choice: freer cluster first, fresh heartbeats first, fail open to stale,
and an index that agrees with a brute-force scan after any sequence of events."""

from __future__ import annotations

import random

import pytest

from services.router.registry import STALE_AFTER_INTERVALS, Registry, load_key
from shared import schema
from shared.book import WorkerEntry
from tests.unit.test_routing import Clock
from tests.unit.test_routing import beat as routing_beat


def beat(worker_id: str, cluster: str, **fields) -> schema.Heartbeat:
    return routing_beat(worker_id, cluster=cluster, **fields)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock) -> Registry:
    return Registry(missed_heartbeats=3, clock=clock)


def picked(registry: Registry, **kw) -> str | None:
    entry = registry.pick("m", **kw)
    return entry.worker_id if entry else None


def test_picks_the_cluster_with_the_larger_share_of_free_slots(registry):
    registry.observe(beat("a-light", "a", in_flight=1))  # the least-loaded worker overall ...
    registry.observe(beat("a-full", "a", in_flight=4))  # ... but cluster a has 3 of 8 slots free
    registry.observe(beat("b-1", "b", in_flight=2))
    registry.observe(beat("b-2", "b", in_flight=2))  # cluster b: 4 of 8 free
    assert picked(registry) in {"b-1", "b-2"}
    registry.dispatched("b-1")
    registry.dispatched("b-2")  # b: 2 of 8 free now
    assert picked(registry) == "a-light"


def test_a_cluster_whose_engines_report_a_queue_counts_as_that_much_busier(registry):
    registry.observe(beat("a-1", "a", in_flight=1, waiting=3))  # our count says 3 of 4 free, but
    registry.observe(beat("b-1", "b", in_flight=2))  # the engine holds 3 more than it runs
    assert picked(registry) == "b-1"
    registry.observe(beat("a-1", "a", in_flight=1, waiting=0))
    assert picked(registry) == "a-1"


def test_stale_cluster_is_avoided_while_a_fresh_one_can_serve(registry, clock):
    registry.observe(beat("idle-but-silent", "a"))
    registry.observe(beat("busy", "b", in_flight=3))
    assert picked(registry) == "idle-but-silent"
    clock.now += STALE_AFTER_INTERVALS + 0.25
    registry.observe(beat("busy", "b", in_flight=3))
    assert picked(registry) == "busy", "a's heartbeat is late: b serves while it can"
    registry.dispatched("busy")
    assert picked(registry) == "idle-but-silent", "nothing fresh has room: fail open to the stale one"


def test_only_stale_workers_fail_open_rather_than_refuse(registry, clock):
    registry.observe(beat("w", "a", interval_s=2.0))
    clock.now += 2.0 * STALE_AFTER_INTERVALS + 0.5
    assert picked(registry) == "w"
    registry.observe(beat("w", "a", interval_s=2.0))
    assert picked(registry) == "w", "a new heartbeat makes it fresh again"


def test_full_fresh_workers_are_not_picked_over_a_stale_free_one(registry, clock):
    registry.observe(beat("stale", "a"))
    clock.now += 2.0
    registry.observe(beat("full", "b", in_flight=4))
    assert picked(registry) == "stale"
    registry.refused("stale")
    assert picked(registry) is None, "full and refused workers are never picked"


def test_a_full_worker_is_not_picked_even_when_its_cluster_has_room(registry):
    registry.observe(beat("free", "a"))
    registry.observe(beat("full", "a", in_flight=4))
    registry.observe(beat("refused", "a"))
    registry.refused("refused")
    assert picked(registry, exclude={"free"}) is None


def test_cluster_under_maintenance_is_used_only_when_nothing_else_can_serve(registry, clock):
    registry.maintenance.add("a")
    registry.observe(beat("in-maintenance", "a"))
    registry.observe(beat("busy", "b", in_flight=3))
    assert picked(registry) == "busy"
    clock.now += 2.0
    registry.observe(beat("in-maintenance", "a"))
    assert picked(registry) == "busy", "a stale cluster in service beats a fresh one in maintenance"
    registry.dispatched("busy")
    assert picked(registry) == "in-maintenance"


def test_heaps_stay_small_under_many_heartbeats(registry):
    for i in range(2000):
        registry.observe(beat(f"w{i % 10}", "a", in_flight=i % 3))
    group = registry._groups["m"]["a"]
    assert len(group.heaps[0]) <= 2 * 10 + 64 + 1
    for i in range(10):
        registry.forget(f"w{i}")
    assert group.heaps[0] == [] and group.free == [0, 0] and group.slots == [0, 0]


# --- the index against a brute-force scan ------------------------------------------------------


def reference(registry: Registry, exclude: set[str]) -> set[str]:
    """Every worker the rule allows picking now (ties in load_key make more than one right)."""
    now = registry.clock()
    ready = [e for e in registry.of_model("m") if e.beat.state == "ready"]

    def tier_of(e: WorkerEntry) -> tuple[bool, bool]:
        stale = now - e.last_seen > STALE_AFTER_INTERVALS * e.beat.interval_s
        return (e.beat.cluster in registry.maintenance, stale)

    for tier in ((False, False), (False, True), (True, False), (True, True)):
        members = [e for e in ready if tier_of(e) == tier]
        clusters: dict[str, list[WorkerEntry]] = {}
        for e in members:
            clusters.setdefault(e.beat.cluster, []).append(e)
        scored = []
        for name, es in clusters.items():
            free = sum(max(0, e.free) for e in es)
            slots = sum(e.beat.capacity for e in es)
            waiting = sum(e.beat.engine.waiting or 0 for e in es)
            if free:
                scored.append((((slots - free + waiting) / slots, -free, name), es))
        for _, es in sorted(scored, key=lambda item: item[0]):
            candidates = [e for e in es if e.free > 0 and e.worker_id not in exclude]
            if candidates:
                best = min(load_key(e) for e in candidates)
                return {e.worker_id for e in candidates if load_key(e) == best}
    return set()


@pytest.mark.parametrize("seed", range(20))
def test_index_agrees_with_a_full_scan_after_any_events(seed):
    rng = random.Random(seed)
    clock = Clock()
    registry = Registry(missed_heartbeats=3, clock=clock)
    ids = [f"w{i}" for i in range(12)]
    for _ in range(400):
        wid = rng.choice(ids)
        op = rng.random()
        if op < 0.4:
            cap = rng.randint(1, 4)
            registry.observe(
                beat(
                    wid,
                    rng.choice("abc"),
                    state=rng.choice(["ready"] * 5 + ["starting", "draining", "stopped"]),
                    capacity=cap,
                    in_flight=rng.randint(0, cap),
                    interval_s=rng.choice([1.0, 2.0]),
                    waiting=rng.choice([None, 0, 2]),
                    model=rng.choice(["m"] * 4 + ["other"]),
                )
            )
        elif op < 0.55:
            registry.dispatched(wid)
        elif op < 0.7:
            registry.answered(wid, rng.choice([None, 0, 1, 3]))
        elif op < 0.75:
            registry.refused(wid)
        elif op < 0.85:
            clock.now += rng.choice([0.25, 0.5, 1.0, 1.5])
        elif op < 0.9:
            registry.expire()
        elif op < 0.95:
            registry.maintenance ^= {rng.choice("abc")}
        exclude = set(rng.sample(ids, rng.randint(0, 3)))
        allowed = reference(registry, exclude)
        got = registry.pick("m", exclude)
        if allowed:
            assert got is not None and got.worker_id in allowed
            assert got.free > 0 and got.beat.state == "ready"
        else:
            assert got is None
