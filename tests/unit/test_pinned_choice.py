"""Cluster-pinned requests in the routing choice and in Demand, and FIRST's endpoint slug."""

from __future__ import annotations

from services.router.registry import Registry
from shared import errors, schema
from shared.book import DemandBook
from tests.unit.test_cluster_choice import Clock, beat


def test_a_pinned_pick_takes_only_its_clusters_workers_even_when_another_is_freer():
    registry = Registry(missed_heartbeats=3, clock=Clock())
    registry.observe(beat("a1", "a", in_flight=3))
    registry.observe(beat("b1", "b"))
    assert registry.pick("m").worker_id == "b1"
    assert registry.pick("m", cluster="a").worker_id == "a1"
    registry.observe(beat("a1", "a", in_flight=4))
    assert registry.pick("m", cluster="a") is None
    assert registry.pick("m", cluster="nowhere") is None


def test_a_pinned_pick_takes_its_cluster_under_maintenance_and_a_federated_one_avoids_it():
    registry = Registry(missed_heartbeats=3, clock=Clock())
    registry.observe(beat("a1", "a"))
    registry.observe(beat("b1", "b", in_flight=3))
    registry.maintenance = {"a"}
    assert registry.pick("m").worker_id == "b1"
    assert registry.pick("m", cluster="a").worker_id == "a1"


def test_demand_is_kept_per_model_and_cluster():
    book = DemandBook(clock=Clock())
    book.observe(schema.Demand(router_id="r1", model="m", queued=2))
    book.observe(schema.Demand(router_id="r1", model="m", queued=3, cluster="b"))
    book.observe(schema.Demand(router_id="r2", model="m", queued=1, cluster="b"))
    book.observe(schema.Demand(router_id="r2", model="m", queued=0, cluster="a"))
    assert book.queued("m") == 6
    assert book.queued("m", cluster="") == 2
    assert book.queued("m", cluster="b") == 4
    assert book.pinned("m") == {"b": 4}


def test_endpoint_not_found_names_the_endpoint_by_firsts_slug():
    err = errors.EndpointNotFound.pinned("sophia", "vllm", "meta-llama/Meta-Llama-3.1-8B-Instruct")
    assert (
        err.message
        == "The requested endpoint 'sophia-vllm-meta-llamameta-llama-31-8b-instruct' does not exist."
    )
    assert (err.status, err.code) == (404, "endpoint_not_found")
    wire = err.to_wire("r")
    assert type(errors.from_wire(wire)) is errors.EndpointNotFound
