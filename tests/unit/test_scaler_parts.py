"""The scaler's pure parts: the rotating-node budget, per-cluster back-off, worker slots for nodes
of several workers, walltime drain times, the KV entries' wire form, and the config's checks."""

from __future__ import annotations

import msgspec
import pytest

from services.scaler.placement import ClusterBackoff, SlotCursor
from services.scaler.policy import share_rotating
from services.worker.control import drain_at
from shared import config as cfg
from shared import nodes, schema


def test_the_rotating_budget_goes_to_the_most_demand_first_and_never_beyond_it():
    wants = {"small": (1, 1.0), "big": (3, 9.0), "mid": (2, 4.0)}
    assert share_rotating(wants, 4) == {"big": 3, "mid": 1, "small": 0}
    assert share_rotating(wants, 0) == {"big": 0, "mid": 0, "small": 0}
    assert share_rotating(wants, -2) == {"big": 0, "mid": 0, "small": 0}  # over budget already
    assert share_rotating(wants, 10) == {"big": 3, "mid": 2, "small": 1}


def test_a_cluster_backs_off_doubling_up_to_the_most_and_a_success_ends_it():
    now = [100.0]
    backoff = ClusterBackoff(2.0, 5.0, clock=lambda: now[0])
    assert [backoff.failed("a") for _ in range(4)] == [2.0, 4.0, 5.0, 5.0]
    assert backoff.waiting("a") and not backoff.waiting("b")
    now[0] += 5.0
    assert not backoff.waiting("a") and backoff.failures("a") == 4
    backoff.failed("a")
    backoff.succeeded("a")
    assert not backoff.waiting("a") and backoff.failures("a") == 0


def test_slots_for_a_node_of_several_workers_are_free_ones_taken_in_turn():
    cursor = SlotCursor()
    assert cursor.take("a", 4, set(), 2) == ["a-n0", "a-n1"]
    assert cursor.take("a", 4, {"a-n0", "a-n1"}, 2) == ["a-n2", "a-n3"]
    assert cursor.take("a", 4, {"a-n0", "a-n1", "a-n2", "a-n3"}, 1) is None
    assert cursor.take("a", 4, {"a-n2"}, 2) == ["a-n0", "a-n1"]  # wraps around, skipping held ones
    assert cursor.take("a", 4, {"a-n1", "a-n3"}, 3) is None


def test_a_worker_drains_its_margin_before_the_walltime_and_never_before_it_starts():
    assert drain_at(None, 300, started=1000.0) == 0.0
    assert drain_at(3600, 300, started=1000.0) == 4300.0
    assert drain_at(100, 300, started=1000.0) == 1000.0  # a margin longer than the walltime: at once


def test_node_entries_and_controls_round_trip_and_garbage_fails_at_the_edge():
    entry = schema.NodeEntry(
        node_id="polaris-1a2b", model="m", cluster="polaris", provider="pbs", state="queued",
        workers=["polaris-n0", "polaris-n1"], reason="Not Running: Insufficient resources",
        requested_at=1.8e9, walltime_s=3600.0, job_id="123.polaris-pbs-01", estimated_start=1.8e9 + 60,
    )  # fmt: skip
    assert schema.node_entry_decoder.decode(schema.encode(entry)) == entry
    control = schema.WorkerControl(action="drain", reason="idle")
    assert schema.worker_control_decoder.decode(schema.encode(control)) == control
    for bad in (
        schema.encode({"kind": "worker_control", "action": "explode"}),
        schema.encode(
            {
                "kind": "node",
                "node_id": "a.b",
                "model": "m",
                "cluster": "c",
                "provider": "p",
                "state": "running",
            }
        ),
    ):
        with pytest.raises(msgspec.ValidationError):
            (schema.worker_control_decoder if b"worker_control" in bad else schema.node_entry_decoder).decode(
                bad
            )


def test_a_node_is_shown_as_firsts_job_with_its_model_status():
    entry = schema.NodeEntry(
        node_id="a-1", model="m", cluster="a", provider="slurm", state="running", workers=["a-n0", "a-n1"],
        job_id="42", job_state="RUNNING", host="gpu07", walltime_s=5400.0,
    )  # fmt: skip
    assert nodes.model_status(entry, {"a-n0": "loading", "a-n1": "ready"}) == "running"
    assert nodes.model_status(entry, {"a-n0": "loading"}) == "starting"
    queued = msgspec.structs.replace(entry, state="queued", job_state="PENDING", reason="Priority")
    assert nodes.model_status(queued, {}) == "queued"
    assert nodes.job_info(entry, "vllm", "running") == {
        "Models": "m", "Framework": "vllm", "Cluster": "a", "Model Status": "running", "Job ID": "42",
        "Job State": "RUNNING", "Node ID": "a-1", "Workers": "a-n0,a-n1", "Nodes Reserved": 1,
        "Host Name": "gpu07", "Walltime": "01:30:00",
    }  # fmt: skip


def test_workers_per_node_must_fit_the_clusters_worker_slots():
    raw = {
        "clusters": [{"name": "a", "max_nodes": 2}],
        "models": [{"id": "m", "engine": {"kind": "sim"}, "scaling": {"workers_per_node": 4}}],
    }
    with pytest.raises(ValueError, match=r"\$\.models\[0\]\.scaling\.workers_per_node: 4 workers"):
        cfg.validate(msgspec.convert(raw, cfg.Config))
    with pytest.raises(msgspec.ValidationError, match=r"lease_ttl_s"):
        msgspec.convert({"scaler": {"lease_ttl_s": 0.1}}, cfg.Config)
