"""The metrics' surface: bounded labels whatever NATS carries, and the docs, the dashboard and the
scrape config naming exactly the metrics the gateway and the exporter export."""

from __future__ import annotations

import json
import re

import msgspec
import pytest
import yaml
from prometheus_client import generate_latest

from services.exporter.federation import Federation, FederationCollector
from services.gateway.metrics import GatewayMetrics, Outcome
from shared import schema
from shared.config import Config, ConfigError, MetricsConfig, load_config
from tests.support import ROOT

CONFIG = msgspec.convert(
    {"clusters": [{"name": "a"}], "models": [{"id": "m", "engine": {"kind": "sim"}}]}, Config
)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def beat(worker_id: str, model: str = "m", cluster: str = "a", state: str = "ready") -> schema.Heartbeat:
    return schema.Heartbeat(worker_id, cluster, model, state, capacity=4, in_flight=1, interval_s=1.0)


def event(kind: str, name: str, **fields) -> schema.Event:
    return schema.Event(kind=kind, name=name, time=0.0, source="s", **fields)


def exported(registry_or_collector) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry_or_collector.collect()
        for s in family.samples
    }


def test_unknown_models_clusters_and_event_kinds_collapse_to_other():
    f = Federation(CONFIG, clock=Clock())
    f.heartbeat(beat("w1", model="typo/model", cluster="elsewhere"))
    f.event(event("martian", "landed"))
    f.event(event("node", "exploded", node_id="n1"))
    f.event(event("limit", "hit", model="nope", data={"left_out": 2}))
    samples = exported(FederationCollector(f))
    assert samples[("first_workers", (("cluster", "other"), ("model", "other"), ("state", "ready")))] == 1
    assert samples[("first_events_total", (("kind", "other"), ("name", "other")))] == 1
    assert samples[("first_events_total", (("kind", "node"), ("name", "other")))] == 1
    assert samples[("first_limit_refusals_total", (("model", "other"),))] == 3
    assert not f.nodes  # an unknown node state is no state to count


def test_a_left_out_count_that_is_not_a_sane_number_counts_as_none():
    f = Federation(CONFIG, clock=Clock())
    for bad in ("9", -1, 1e12, True):
        f.event(event("limit", "hit", model="m", data={"left_out": bad}))
    assert f.refusals["m"] == 4


def test_nodes_follow_their_latest_event_and_leave_when_released_or_failed():
    f = Federation(CONFIG, clock=Clock())
    f.event(event("node", "requested", node_id="n1", cluster="a", model="m"))
    f.event(event("node", "requested", node_id="n2", cluster="a", model="m"))
    f.event(event("node", "running", node_id="n1", cluster="a", model="m"))
    samples = exported(FederationCollector(f))
    key = (("cluster", "a"), ("model", "m"))
    assert samples[("first_nodes", (*key, ("state", "running")))] == 1
    assert samples[("first_nodes", (*key, ("state", "requested")))] == 1
    f.event(event("node", "failed", node_id="n2", cluster="a", model="m"))
    f.event(event("node", "released", node_id="n1", cluster="a", model="m"))
    assert not any(name == "first_nodes" for name, _ in exported(FederationCollector(f)))


def test_a_silent_worker_leaves_after_its_missed_heartbeats_and_a_stopped_one_at_once():
    clock = Clock()
    f = Federation(CONFIG, clock=clock)
    f.heartbeat(beat("w1"))
    f.heartbeat(beat("w2"))
    f.heartbeat(beat("w2", state="stopped"))
    ready = ("first_workers", (("cluster", "a"), ("model", "m"), ("state", "ready")))
    assert exported(FederationCollector(f))[ready] == 1
    clock.now += CONFIG.router.missed_heartbeats * 1.0 + 0.1
    assert ready not in exported(FederationCollector(f))


def test_the_gateway_counts_an_unknown_cluster_as_other_and_none_as_none():
    metrics = GatewayMetrics(CONFIG, lambda: None)
    for cluster in ("a", "elsewhere", ""):
        outcome = Outcome("chat")
        outcome.cluster = cluster
        metrics.observe(outcome, "m", 200, 0.0, 1.0)
    clusters = {
        dict(labels)["cluster"]
        for (name, labels) in exported(metrics.registry)
        if name == "first_gateway_requests_total"
    }
    assert clusters == {"a", "other", "none"}


def _all_metric_names() -> set[str]:
    """Every metric family both targets export, once each has something to show."""
    gateway = GatewayMetrics(CONFIG, lambda: None)
    gateway.observe(Outcome("chat"), "m", 200, 0.0, 1.0)
    gateway.refused("m")
    f = Federation(CONFIG, clock=Clock())
    f.heartbeat(beat("w1"))
    f.demand(schema.Demand("r1", "m", 1))
    f.router_beat(schema.RouterBeat("r1", 1.0))
    for kind, name in (("node", "running"), ("scale", "up"), ("limit", "hit"), ("worker", "lost")):
        f.event(event(kind, name, node_id="n1", model="m", cluster="a"))
    names = {m.name for m in gateway.registry.collect()}
    names |= {m.name for m in FederationCollector(f).collect()}
    names.add("first_exporter_nats_reconnects")
    assert generate_latest(gateway.registry)  # it renders
    return names


def test_docs_dashboard_and_scrape_config_name_exactly_what_is_exported():
    names = _all_metric_names()
    documented = set(re.findall(r"`(first_[a-z_]+?)(?:_total)?`", (ROOT / "docs/metrics.md").read_text()))
    counters = {n for n in names if n + "_total" in (ROOT / "docs/metrics.md").read_text()}
    assert names <= documented | counters, f"not in docs/metrics.md: {names - documented - counters}"
    dashboard = json.loads((ROOT / "compose/grafana/first-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {
        re.sub(r"_(total|bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"first_[a-z_]+", e)
    }
    assert used and used <= names, f"the dashboard queries metrics nobody exports: {used - names}"
    scrape = yaml.safe_load((ROOT / "compose/prometheus.yml").read_text())
    jobs = {j["job_name"]: j["metrics_path"] for j in scrape["scrape_configs"]}
    constants = {v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "constant"}
    assert jobs == {constants["gateway_job"]: "/metrics", constants["exporter_job"]: "/metrics"}


def test_a_stored_node_event_never_overwrites_a_live_one_heard_during_the_replay():
    f = Federation(CONFIG, clock=Clock())
    f.replaying = True
    f.event(event("node", "stopping", node_id="n1", cluster="a", model="m"))  # live, newest
    f.replay(event("node", "running", node_id="n1", cluster="a", model="m"))  # stored, older
    f.replay(event("node", "running", node_id="n2", cluster="a", model="m"))
    f.replayed()
    assert {n: node.state for n, node in f.nodes.items()} == {"n1": "stopping", "n2": "running"}


def test_a_bad_metrics_setting_fails_with_its_field(tmp_path):
    for text, field in (
        ("[metrics]\nexporter_port = 70000\n", "$.metrics.exporter_port"),
        ("[metrics]\ngateways = false\n", "gateways"),
    ):
        (path := tmp_path / "first.toml").write_text(text)
        with pytest.raises(ConfigError) as failed:
            load_config(path)
        assert field in str(failed.value)
    (path := tmp_path / "first.toml").write_text("[metrics]\nexporter_port = 9464\ngateway = false\n")
    assert load_config(path).metrics == MetricsConfig(gateway=False, exporter_port=9464)


def test_histogram_buckets_count_a_value_on_a_bound_in_that_bound_and_are_cumulative():
    metrics = GatewayMetrics(CONFIG, lambda: None)
    for seconds in (0.25, 0.3, 1000.0):  # on a bound, inside one, past the last
        outcome = Outcome("completion")
        outcome.cluster = "a"
        metrics.observe(outcome, "m", 200, 0.0, seconds)
    samples = exported(metrics.registry)
    labels = (("cluster", "a"), ("endpoint", "completion"))

    def bucket(le: str) -> float:
        return samples[
            ("first_gateway_request_duration_seconds_bucket", (*labels, ("le", le), ("model", "m")))
        ]

    assert [bucket(le) for le in ("0.1", "0.25", "0.5", "600.0", "+Inf")] == [0, 1, 2, 2, 3]
    count = samples[("first_gateway_request_duration_seconds_count", (*labels, ("model", "m")))]
    total = samples[("first_gateway_request_duration_seconds_sum", (*labels, ("model", "m")))]
    assert (count, total) == (3, 1000.55)
