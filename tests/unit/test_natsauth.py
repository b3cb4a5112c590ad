"""NATS users and permissions as written for a server (shared/natsauth.py, ``first nats-auth``).

What the server does with them is proven in tests/integration/test_nats_permissions.py; these
check the files: who exists, that seeds survive a rerun, that they are private.
"""

from __future__ import annotations

import stat

import msgspec
import orjson
import pytest

from services.admin import nats_auth
from services.cli import _parser
from shared import config as cfg
from shared import natsauth
from shared.connect import credential_options
from shared.subjects import Subjects, service_control


def _config(**nats) -> cfg.Config:
    config = msgspec.convert(
        {
            "nats": nats,
            "clusters": [{"name": "polaris", "max_nodes": 3}],
            "models": [{"id": "m", "engine": {"kind": "sim"}}],
        },
        cfg.Config,
    )
    cfg.validate(config)
    return config


def test_one_user_per_service_worker_slot_client_ops_and_admin():
    roles = natsauth.roles(_config(clients=[{"name": "pipeline", "groups": ["g"]}]))
    assert [(r.name, r.kind) for r in roles] == [
        ("gateway", "gateway"), ("router", "router"), ("scaler", "scaler"), ("batch", "batch"),
        ("polaris-n0", "worker"), ("polaris-n1", "worker"), ("polaris-n2", "worker"),
        ("pipeline", "client"), ("ops", "ops"), ("admin", "admin"),
    ]  # fmt: skip


def test_a_worker_slot_may_touch_only_its_own_subjects():
    role = natsauth.worker_role(_config(), "polaris", 1)
    discovery = [p for p in role.subscribe if p.startswith("$SRV.") or ".v1.service." in p]
    assert sorted(discovery) == sorted(
        [*service_control("first-worker"), "first.v1.service.first-worker.polaris-n1.status"]
    )
    assert sorted(set(role.subscribe) - set(discovery)) == [
        "first.v1.worker.polaris-n1.cancel",
        "first.v1.worker.polaris-n1.cancel.user.*",
        "first.v1.worker.polaris-n1.control",
        "first.v1.worker.polaris-n1.infer",
    ]
    assert "first.v1.heartbeat.polaris.polaris-n1" in role.publish
    assert "first.v1.events.worker.*.polaris-n1" in role.publish  # its own events, as itself
    own = ("reply.>", "events.worker.*.polaris-n1")
    assert not [
        p for p in role.publish if "*" in p.replace(own[0], "").replace(own[1], "") or p.endswith(".infer")
    ]


def test_only_the_scaler_may_tell_workers_to_drain_and_only_it_writes_its_node_table():
    config = _config()
    roles = {r.name: r for r in natsauth.service_roles(config)}
    control, table = "first.v1.worker.*.control", "$KV.first_scaler.>"
    assert control in roles["scaler"].publish and table in roles["scaler"].publish
    for name, role in roles.items():
        if name != "scaler":
            assert not [p for p in role.publish if p.endswith(".control") or p.startswith("$KV.first_scaler")]
    assert not [p for p in natsauth.worker_role(config, "polaris", 0).publish if "control" in p]
    ops = natsauth.ops_role(config)
    assert "$JS.API.DIRECT.GET.KV_first_scaler.>" in ops.publish and table not in ops.publish


def test_a_client_submits_cancels_and_reads_as_itself_only():
    role = natsauth.client_role(_config(), "pipeline")
    assert all("pipeline" in p or p == "first.v1.status" for p in role.publish)
    assert role.subscribe[0] == "first.v1.reply.pipeline.*"
    assert not [p for p in role.publish + role.subscribe if p.startswith(("$JS", "_INBOX"))]


def test_seeds_are_private_and_kept_across_runs(tmp_path):
    config = _config()
    first = natsauth.write_credentials(tmp_path, natsauth.roles(config))
    keys = first.public_keys()
    seed = first.seed_file("router")
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600 and stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    again = natsauth.write_credentials(tmp_path, natsauth.roles(config))
    assert again.public_keys() == keys


def test_every_user_reads_replies_only_in_its_own_inbox(tmp_path):
    credentials = natsauth.write_credentials(tmp_path, natsauth.roles(_config()))
    users = credentials.authorization()["authorization"]["users"]
    for user in users:
        inboxes = [s for s in user["permissions"]["subscribe"]["allow"] if s.startswith("_INBOX")]
        assert inboxes == [f"_INBOX.{user['nkey']}.>"] or user["permissions"]["subscribe"]["allow"][0] == ">"
    seed = credentials.seed_file("gateway")
    options = credential_options(str(seed))
    assert options["inbox_prefix"] == f"_INBOX.{natsauth.public_key(seed.read_bytes())}"


def test_credentials_that_cannot_be_read_are_named_in_the_error(tmp_path):
    with pytest.raises(OSError, match=r"cannot read NATS credentials .*missing\.nk"):
        credential_options(str(tmp_path / "missing.nk"))
    (tmp_path / "junk.nk").write_text("not a seed")
    with pytest.raises(OSError, match="hold no user nkey seed"):
        credential_options(str(tmp_path / "junk.nk"))


@pytest.mark.parametrize("name", ["gateway", "admin", "polaris-n0", "a.b"])
def test_a_client_may_not_take_a_name_of_the_stack(name):
    with pytest.raises((ValueError, msgspec.ValidationError)):
        _config(clients=[{"name": name}])


async def test_first_nats_auth_adds_users_and_keeps_existing_seeds(tmp_path, capsys):
    conf = tmp_path / "first.toml"
    conf.write_text(
        '[[clusters]]\nname = "polaris"\nmax_nodes = 1\n[[models]]\nid = "m"\nengine = { kind = "sim" }\n'
    )
    out = tmp_path / "nats"

    async def first_nats_auth(*argv: str) -> int:
        args = _parser().parse_args(["nats-auth", "--config", str(conf), "--out", str(out), *argv])
        return await nats_auth.main(cfg.load_config(conf), args)

    assert await first_nats_auth("--port", "4333") == 0
    router_seed = (out / "credentials" / "router.nk").read_bytes()
    conf.write_text(conf.read_text() + '[nats]\nclients = [{ name = "pipeline" }]\n')
    assert await first_nats_auth() == 0
    assert (out / "credentials" / "router.nk").read_bytes() == router_seed
    server = orjson.loads((out / "nats-server.conf").read_bytes())
    assert len(server["authorization"]["users"]) == 8  # 4 services, 1 slot, pipeline, ops, admin
    assert server["port"] == 4222 and "pipeline" in capsys.readouterr().out


def test_a_sites_leaf_link_carries_only_what_its_worker_slots_need():
    config = msgspec.convert(
        {"clusters": [{"name": "polaris", "max_nodes": 2}, {"name": "sophia"}], "models": []}, cfg.Config
    )
    role = natsauth.leaf_role(config, "polaris", ["polaris"])
    s = Subjects(config.nats.subject_prefix)
    assert role.name == "leaf-polaris" and s.router_ack_any in role.publish
    assert set(role.subscribe) == {  # not the discovery requests: their answers could not come back
        sub
        for i in range(2)
        for sub in natsauth.worker_role(config, "polaris", i).subscribe
        if not sub.startswith("$SRV.") and ".v1.service." not in sub
    }
    assert not any("sophia" in p for p in role.publish + role.subscribe)
    assert s.infer not in role.subscribe and s.reply_all not in role.subscribe
    with pytest.raises(ValueError, match="leaf-"):
        cfg.validate(
            msgspec.convert(
                {"clusters": [{"name": "a"}], "nats": {"clients": [{"name": "leaf-a"}]}}, cfg.Config
            )
        )
