"""The service API's subjects (shared/subjects.py) and who may use them (shared/natsauth.py): each
service answers only its own name's requests, ops asks only the three verbs' forms, nobody but
admin may publish or subscribe to all of ``$SRV``; answers go to an inbox only."""

from __future__ import annotations

from importlib import metadata as package_metadata

import msgspec
import pytest
from nats.micro.service import SEMVER_REGEX

from shared import config as cfg
from shared import discovery, natsauth
from shared.subjects import Subjects, service_control, service_discovery, service_request


def _config() -> cfg.Config:
    config = msgspec.convert(
        {
            "clusters": [{"name": "polaris", "max_nodes": 1}],
            "models": [{"id": "m", "engine": {"kind": "sim"}}],
        },
        cfg.Config,
    )
    cfg.validate(config)
    return config


def test_discovery_requests_have_the_service_apis_three_forms():
    assert service_request("PING") == "$SRV.PING"
    assert service_request("INFO", "first-router") == "$SRV.INFO.first-router"
    assert service_request("STATS", "first-worker", "abc") == "$SRV.STATS.first-worker.abc"
    assert service_control("first-router") == [
        "$SRV.PING", "$SRV.PING.first-router", "$SRV.PING.first-router.*",
        "$SRV.INFO", "$SRV.INFO.first-router", "$SRV.INFO.first-router.*",
        "$SRV.STATS", "$SRV.STATS.first-router", "$SRV.STATS.first-router.*",
    ]  # fmt: skip
    assert set(service_discovery()) == {
        f"$SRV.{v}{t}" for v in ("PING", "INFO", "STATS") for t in ("", ".*", ".*.*")
    }
    assert Subjects("p").service_status("first-worker", "a-n0") == "p.v1.service.first-worker.a-n0.status"


@pytest.mark.parametrize(
    "call",
    [
        lambda: service_request("DELETE"),
        lambda: service_request("PING", "first.router"),
        lambda: service_request("PING", "first-router", ">"),
        lambda: service_control("*"),
        lambda: Subjects("p").service_status("first-worker", "a.b"),
    ],
)
def test_discovery_subjects_refuse_what_would_change_their_shape(call):
    with pytest.raises(ValueError):
        call()


def test_each_service_role_answers_its_own_name_and_ops_asks_only_the_three_forms():
    roles = {r.name: r for r in natsauth.roles(_config())}
    for role, name in [("gateway", "first-gateway"), ("router", "first-router"), ("scaler", "first-scaler"),
                       ("polaris-n0", "first-worker")]:  # fmt: skip
        srv = [p for p in roles[role].subscribe if p.startswith("$SRV")]
        assert srv == service_control(name) and roles[role].allow_responses, role
        assert not [p for p in roles[role].publish if p.startswith("$SRV")], role
    assert "first.v1.service.first-worker.polaris-n0.status" in roles["polaris-n0"].subscribe
    ops = roles["ops"]
    assert [p for p in ops.publish if p.startswith("$SRV")] == service_discovery()
    assert "first.v1.service.*.*.status" in ops.publish
    for role in roles.values():
        if role.kind != "admin":
            assert not [p for p in role.publish + role.subscribe if p.startswith("$SRV") and ">" in p], (
                role.name
            )


def test_answers_go_to_an_inbox_only():
    assert discovery.answerable("_INBOX.UABC.x1")
    assert not discovery.answerable("first.v1.infer")
    assert not discovery.answerable("")


async def test_asking_with_an_unknown_verb_is_refused_before_anything_is_sent():
    with pytest.raises(ValueError, match="PING, INFO, STATS"):
        await discovery.ask(None, "LIST")  # type: ignore[arg-type]


def test_the_version_is_the_packages_and_semantic_as_the_service_api_wants():
    assert discovery.version() == package_metadata.version("first-nats")
    assert SEMVER_REGEX.match(discovery.version())
