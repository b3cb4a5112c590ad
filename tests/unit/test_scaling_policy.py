"""The scaler's decision for one model: start what demand needs, release what sits idle."""

from __future__ import annotations

from services.scaler.policy import ModelView, WorkerLoad, decide
from shared.config import ScalingPolicy

CAP = 4


def ready(
    worker_id: str, *, in_flight: int = 0, idle_s: float = 0.0, node_id: str | None = None
) -> WorkerLoad:
    node = f"node-{worker_id}" if node_id is None else node_id
    return WorkerLoad(worker_id=worker_id, node_id=node, state="ready", in_flight=in_flight, idle_s=idle_s)


def policy(min_hot: int = 0, max_workers: int = 4, idle_s: float = 60.0) -> ScalingPolicy:
    return ScalingPolicy(min_hot=min_hot, max_workers=max_workers, idle_s=idle_s)


def test_cold_start_one_node_for_the_first_queued_request():
    d = decide(policy(), CAP, ModelView(queued=1))
    assert (d.start, d.stop, d.desired) == (1, (), 1)


def test_nothing_to_do_without_demand_or_min_hot():
    d = decide(policy(), CAP, ModelView(queued=0))
    assert (d.start, d.stop, d.desired) == (0, (), 0)


def test_a_node_already_starting_covers_the_demand():
    d = decide(policy(), CAP, ModelView(queued=3, pending_nodes=1))
    assert d.start == 0


def test_a_worker_still_loading_covers_the_demand():
    loading = WorkerLoad("w", "node-w", "loading", 0, 0.0)
    assert decide(policy(), CAP, ModelView(queued=2, workers=[loading])).start == 0


def test_min_hot_is_kept_without_demand():
    d = decide(policy(min_hot=2), CAP, ModelView(queued=0, workers=[ready("a")]))
    assert (d.start, d.desired) == (1, 2)


def test_never_beyond_max_workers_even_under_a_big_queue():
    d = decide(policy(max_workers=3), CAP, ModelView(queued=1000, workers=[ready("a", in_flight=CAP)]))
    assert (d.start, d.desired) == (2, 3)
    at_max = ModelView(queued=1000, workers=[ready(w, in_flight=CAP) for w in "abc"])
    assert decide(policy(max_workers=3), CAP, at_max).start == 0


def test_scale_up_when_in_flight_plus_queued_exceed_current_capacity():
    view = ModelView(queued=1, workers=[ready("a", in_flight=CAP)])
    assert decide(policy(), CAP, view).start == 1


def test_no_scale_up_while_current_workers_have_room():
    view = ModelView(queued=1, workers=[ready("a", in_flight=CAP - 1)])
    assert decide(policy(), CAP, view).start == 0


def test_pending_nodes_count_towards_scale_up():
    view = ModelView(queued=CAP * 2, workers=[ready("a", in_flight=CAP)], pending_nodes=1)
    assert decide(policy(), CAP, view).start == 1  # needs 3, has 1 serving + 1 coming


def test_draining_workers_do_not_count_as_capacity():
    draining = WorkerLoad("d", "node-d", "draining", 0, 0.0)
    assert decide(policy(), CAP, ModelView(queued=1, workers=[draining])).start == 1


def test_idle_worker_is_released_after_idle_s():
    view = ModelView(queued=0, workers=[ready("a", idle_s=60.0)])
    assert decide(policy(idle_s=60.0), CAP, view).stop == ("node-a",)


def test_worker_idle_less_than_idle_s_is_kept():
    view = ModelView(queued=0, workers=[ready("a", idle_s=59.9)])
    assert decide(policy(idle_s=60.0), CAP, view).stop == ()


def test_most_idle_released_first_and_never_below_min_hot():
    workers = [ready("a", idle_s=100), ready("b", idle_s=500), ready("c", idle_s=300)]
    d = decide(policy(min_hot=1, idle_s=60), CAP, ModelView(queued=0, workers=workers))
    assert d.stop == ("node-b", "node-c")
    assert d.desired == 1


def test_idle_workers_are_not_released_while_requests_wait():
    workers = [ready("a", in_flight=CAP), ready("b", idle_s=1000), ready("c", idle_s=1000)]
    d = decide(policy(idle_s=60), CAP, ModelView(queued=1, workers=workers))
    assert d.stop == ()


def test_workers_this_scaler_did_not_start_are_never_released():
    workers = [ready("ext", idle_s=1000, node_id=""), ready("ours", idle_s=10)]
    d = decide(policy(idle_s=60), CAP, ModelView(queued=0, workers=workers))
    assert d.stop == ()


def test_busy_workers_are_not_released_only_idle_ones():
    workers = [ready("busy", in_flight=1, idle_s=0), ready("idle", idle_s=1000)]
    d = decide(policy(idle_s=60), CAP, ModelView(queued=0, workers=workers))
    assert d.stop == ("node-idle",)


def test_no_release_while_a_node_is_still_starting():
    view = ModelView(queued=0, workers=[ready("a", idle_s=1000)], pending_nodes=1)
    assert decide(policy(idle_s=60), CAP, view).stop == ()


def test_starting_and_loading_workers_are_not_released():
    workers = [
        WorkerLoad("s", "node-s", "starting", 0, 1000.0),
        WorkerLoad("l", "node-l", "loading", 0, 1000),
    ]
    d = decide(policy(idle_s=60), CAP, ModelView(queued=0, workers=workers))
    assert d.stop == ()


def test_a_new_node_goes_where_no_job_waits_in_the_batch_queue_then_where_we_have_fewest():
    import msgspec

    from services.scaler.providers.base import NodeSpec
    from services.scaler.service import NodeRecord, Scaler
    from shared import config as cfg
    from shared.subjects import Subjects

    config = msgspec.convert(
        {"clusters": [{"name": "a", "max_nodes": 4}, {"name": "b", "max_nodes": 4}, {"name": "c", "max_nodes": 1}],
         "models": [{"id": "m", "engine": {"kind": "sim"}}]},
        cfg.Config,
    )  # fmt: skip
    scaler = Scaler(None, Subjects("t"), config, {"a": None, "b": None, "c": None})  # no NATS: a pure choice

    def node(cluster: str, i: int, state: str) -> None:
        scaler.nodes[f"{cluster}{i}"] = NodeRecord(NodeSpec(f"{cluster}{i}", "m", cluster), None, state, 0.0)

    node("a", 0, "running")
    node("a", 1, "running")
    node("b", 0, "requested")  # a job still pending in b's batch queue
    node("c", 0, "running")  # c is full
    model = config.models[0]
    assert scaler._pick_cluster(model) == "a"  # two nodes, but none pending
    node("a", 2, "requested")
    assert scaler._pick_cluster(model) == "b"  # both have one pending: fewer nodes of ours
    scaler.maintenance.clusters = {"b": "upgrade"}
    assert scaler._pick_cluster(model) == "a"
    assert scaler._pick_cluster(model, only="b") is None
