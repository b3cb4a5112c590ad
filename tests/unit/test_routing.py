"""The router's choice of worker, and the books of heartbeats and demand, on a fake clock."""

from __future__ import annotations

import pytest

from services.router.registry import Registry
from shared import schema
from shared.book import DemandBook, RecentIds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def beat(
    worker_id: str,
    *,
    model: str = "m",
    state: str = "ready",
    capacity: int = 4,
    in_flight: int = 0,
    interval_s: float = 1.0,
    waiting: int | None = None,
    cluster: str = "c",
) -> schema.Heartbeat:
    return schema.Heartbeat(
        worker_id=worker_id,
        cluster=cluster,
        model=model,
        state=state,
        capacity=capacity,
        in_flight=in_flight,
        interval_s=interval_s,
        engine=schema.EngineLoad(waiting=waiting),
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock) -> Registry:
    return Registry(missed_heartbeats=3, clock=clock)


def picked(registry: Registry, model: str = "m", **kw) -> str | None:
    entry = registry.pick(model, **kw)
    return entry.worker_id if entry else None


def test_no_workers_no_pick(registry):
    assert picked(registry) is None


def test_picks_the_least_loaded_share_of_capacity(registry):
    registry.observe(beat("busy", capacity=4, in_flight=2))  # 50 %
    registry.observe(beat("big", capacity=8, in_flight=3))  # 37.5 %
    registry.observe(beat("fuller", capacity=2, in_flight=1))  # 50 %
    assert picked(registry) == "big"


def test_equal_share_prefers_fewer_requests_waiting_in_the_engine(registry):
    registry.observe(beat("queueing", in_flight=1, waiting=3))
    registry.observe(beat("clear", in_flight=1, waiting=0))
    assert picked(registry) == "clear"


@pytest.mark.parametrize("state", ["starting", "loading", "draining"])
def test_workers_not_ready_are_never_picked(registry, state):
    registry.observe(beat("w", state=state))
    assert picked(registry) is None
    registry.observe(beat("w", state="ready"))
    assert picked(registry) == "w"


def test_full_workers_are_skipped(registry):
    registry.observe(beat("full", capacity=2, in_flight=2))
    assert picked(registry) is None
    registry.observe(beat("spare", capacity=2, in_flight=1))
    assert picked(registry) == "spare"


def test_workers_of_other_models_are_not_picked(registry):
    registry.observe(beat("w-other", model="other"))
    assert picked(registry, "m") is None
    assert picked(registry, "other") == "w-other"


def test_exclude_skips_workers_already_tried(registry):
    registry.observe(beat("a"))
    registry.observe(beat("b", in_flight=1))
    assert picked(registry) == "a"
    assert picked(registry, exclude={"a"}) == "b"
    assert picked(registry, exclude=frozenset({"a", "b"})) is None


def test_dispatched_counts_locally_so_the_next_pick_spreads_load(registry):
    registry.observe(beat("a", capacity=2))
    registry.observe(beat("b", capacity=2))
    first = picked(registry)
    registry.dispatched(first)
    second = picked(registry)
    assert second is not None and second != first
    registry.dispatched(second)
    registry.dispatched(first)
    registry.dispatched(second)
    assert picked(registry) is None, "both workers are full by this router's own count"


def test_heartbeat_replaces_the_workers_own_count(registry):
    registry.observe(beat("a", capacity=1))
    registry.dispatched("a")
    assert picked(registry) is None, "a dispatch on its way counts"
    registry.answered("a", 1)  # accepted: the worker holds one
    assert picked(registry) is None
    registry.observe(beat("a", capacity=1, in_flight=0))  # the request finished
    assert picked(registry) == "a"


def test_a_dispatch_reply_corrects_the_count_other_routers_changed(registry):
    registry.observe(beat("a", capacity=4, in_flight=0))
    registry.dispatched("a")
    registry.answered("a", 4)  # other routers filled it meanwhile
    assert picked(registry) is None
    registry.dispatched("a")
    registry.answered("a", None)  # no answer at all: only the reservation ends
    assert registry.get("a").reserved == 0


def test_refused_worker_is_passed_over_until_its_next_heartbeat(registry):
    registry.observe(beat("a"))
    registry.observe(beat("b", in_flight=3))
    registry.refused("a")
    assert picked(registry) == "b"
    registry.refused("b")
    assert picked(registry) is None
    registry.observe(beat("a"))
    assert picked(registry) == "a"


def test_dispatched_and_refused_on_unknown_worker_are_harmless(registry):
    registry.dispatched("ghost")
    registry.refused("ghost")
    assert registry.get("ghost") is None


def test_stopped_heartbeat_forgets_the_worker_at_once(registry):
    registry.observe(beat("a"))
    assert registry.observe(beat("a", state="stopped")) is None
    assert registry.get("a") is None
    assert picked(registry) is None


def test_silent_worker_is_forgotten_after_missed_heartbeats(registry, clock):
    registry.observe(beat("a", interval_s=2.0))
    clock.now += 3 * 2.0 - 0.01
    assert picked(registry) == "a", "still within three intervals"
    clock.now += 0.02
    assert registry.expire() == ["a"]
    assert picked(registry) is None
    assert registry.get("a") is None


def test_each_heartbeat_restarts_the_silence_timer(registry, clock):
    registry.observe(beat("a", interval_s=1.0))
    for _ in range(5):
        clock.now += 2.5
        registry.observe(beat("a", interval_s=1.0))
    clock.now += 2.9
    assert picked(registry) == "a"


def test_expire_reports_only_the_silent_workers(registry, clock):
    registry.observe(beat("slow", interval_s=10.0))
    registry.observe(beat("fast", interval_s=1.0))
    clock.now += 5.0
    assert registry.expire() == ["fast"]
    assert [e.worker_id for e in registry.workers()] == ["slow"]


# --- DemandBook --------------------------------------------------------------------------------


def demand(router: str, queued: int, model: str = "m", interval_s: float = 1.0) -> schema.Demand:
    return schema.Demand(router_id=router, model=model, queued=queued, interval_s=interval_s)


def test_demand_is_summed_over_routers_per_model(clock):
    book = DemandBook(clock=clock)
    book.observe(demand("r1", 2))
    book.observe(demand("r2", 3))
    book.observe(demand("r1", 7, model="other"))
    assert book.queued("m") == 5
    assert book.queued("other") == 7
    assert book.queued("none") == 0


def test_latest_report_of_a_router_replaces_its_earlier_one(clock):
    book = DemandBook(clock=clock)
    book.observe(demand("r1", 4))
    book.observe(demand("r1", 0))
    assert book.queued("m") == 0


def test_demand_expires_after_three_intervals_of_silence(clock):
    book = DemandBook(clock=clock)
    book.observe(demand("r1", 2, interval_s=2.0))
    book.observe(demand("r2", 1, interval_s=10.0))
    clock.now += 5.9
    assert book.queued("m") == 3
    clock.now += 0.2
    assert book.queued("m") == 1, "r1 fell silent for more than 3 x 2 s"


def test_exclude_router_leaves_out_its_own_report(clock):
    book = DemandBook(clock=clock)
    book.observe(demand("me", 4))
    book.observe(demand("peer", 1))
    assert book.queued("m", exclude_router="me") == 1


def test_recent_ids_forget_after_their_ttl():
    clock = Clock()
    recent = RecentIds(ttl_s=10, clock=clock)
    recent.add("a")
    clock.now += 5
    recent.add("b")
    assert "a" in recent and "b" in recent and "c" not in recent
    clock.now += 6
    assert "a" not in recent and "b" in recent
    recent.add("c")  # adding prunes what expired
    assert list(recent._items) == ["b", "c"]
