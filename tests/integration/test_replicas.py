"""``nats.jetstream_replicas``: the stores without a replicas setting of their own (maintenance, the
scaler's node table, batch files, batches, batch lines and results) get that many copies on a
clustered hub, and keep getting them at each start; where the server cannot keep them, the store is
made or kept with the copies it can have and a warning names it (docs/federation.md, "JetStream
replicas")."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import msgspec
import pytest
from nats.aio.client import Client as NATS
from structlog.testing import capture_logs

from services.admin import clusters as admin_clusters
from services.batch.queues import Queues
from services.scaler.service import Scaler
from shared import batchstore, clusterstate, natsauth
from shared import config as cfg
from shared.subjects import Subjects
from tests.integration.conftest import make_config
from tests.integration.test_leafnodes import S, _jetstream_ready, federation  # noqa: F401
from tests.support import eventually


@dataclass
class Keepers:
    """Each store's keeper as it connects in production: ``first cluster maintenance`` (admin, by
    URL and seed), the scaler, the gateway, the batch service."""

    url: str
    admin_seed: str
    scaler: NATS
    gateway: NATS
    batch: NATS

    async def start(self, config: cfg.Config, cluster: str) -> None:
        """What each keeper does with its stores when it starts."""
        args = argparse.Namespace(
            nats=self.url, credentials=self.admin_seed, json=False, message="", action="maintenance"
        )
        args.name, args.state = cluster, "on"
        assert await admin_clusters.main(config, args) == 0  # first cluster maintenance <cluster> on
        subjects = Subjects(config.nats.subject_prefix)
        await Scaler(self.scaler, subjects, config, {}).fleet.open(natsauth.scaler_bucket(config))
        await batchstore.Files.open(self.gateway, config)
        await batchstore.Batches.open(self.gateway, config)
        await Queues(self.batch, subjects, config).ensure()


def _streams(config: cfg.Config) -> list[str]:
    """The JetStream streams behind the stores jetstream_replicas governs."""
    return [
        f"KV_{clusterstate.bucket_name(config)}",
        f"KV_{natsauth.scaler_bucket(config)}",
        f"OBJ_{batchstore.files_bucket(config)}",
        f"KV_{batchstore.batches_bucket(config)}",
        batchstore.lines_stream(config),
        batchstore.results_stream(config),
    ]


def _with_replicas(config: cfg.Config, replicas: int) -> cfg.Config:
    return msgspec.structs.replace(
        config, nats=msgspec.structs.replace(config.nats, jetstream_replicas=replicas)
    )


async def _replicas(js, config: cfg.Config) -> dict[str, int]:
    return {name: (await js.stream_info(name)).config.num_replicas for name in _streams(config)}


def _warned(logs: list[dict]) -> list[str]:
    return [e["store"] for e in logs if e["event"] == "jetstream_replicas_unchanged"]


@pytest.mark.slow  # the hub's JetStream cluster takes ~5 s to elect its leader
async def test_every_store_without_its_own_setting_gets_jetstream_replicas_on_the_hub(
    federation,  # noqa: F811
    capsys,
):
    """On the 3-server hub, each store is created with jetstream_replicas = 3 by its keeper (each
    as its own NATS role, whose permissions must allow it); started again with 1, each is brought
    down to 1, and with 3 back up to 3: the server's stream info says so every time."""
    f = federation
    admin = await f.connect(f.hub[0].url, "admin")
    js = admin.jetstream(timeout=5)
    await eventually(lambda: _jetstream_ready(js), timeout=10, what="JetStream on the hub cluster")
    keepers = Keepers(
        f.hub[0].url,
        str(f.creds.seed_file("admin")),
        scaler=await f.connect(f.hub[1].url, "scaler"),
        gateway=await f.connect(f.hub[2].url, "gateway"),
        batch=await f.connect(f.hub[0].url, "batch"),
    )
    for n in (3, 1, 3):
        config = _with_replicas(f.config, n)
        with capture_logs() as logs:
            await keepers.start(config, "polaris")
        assert await _replicas(js, config) == dict.fromkeys(_streams(config), n)
        assert _warned(logs) == []
    capsys.readouterr()


async def test_a_server_that_cannot_keep_the_copies_gets_the_stores_with_one_and_a_warning(
    nats_url, nc, subjects, capsys
):
    """The session's nats-server is not clustered: with jetstream_replicas = 3, every store is
    still made (one copy each) and usable, at each start, and each start warns once per store,
    naming it, with the server's reason."""
    config = _with_replicas(make_config([{"id": "m"}], nats={"subject_prefix": subjects.prefix}), 3)
    keepers = Keepers(nats_url, "", scaler=nc, gateway=nc, batch=nc)
    stores = [
        f"KV bucket {clusterstate.bucket_name(config)}",
        f"KV bucket {natsauth.scaler_bucket(config)}",
        f"object store {batchstore.files_bucket(config)}",
        f"KV bucket {batchstore.batches_bucket(config)}",
        f"stream {batchstore.lines_stream(config)}",
        f"stream {batchstore.results_stream(config)}",
    ]
    js = nc.jetstream(timeout=5)
    for _ in ("created", "started again"):
        with capture_logs() as logs:
            await keepers.start(config, "a")
        assert sorted(set(_warned(logs))) == sorted(stores)
        assert all("non-clustered" in e["error"] for e in logs if e.get("store"))
        assert await _replicas(js, config) == dict.fromkeys(_streams(config), 1)
    kv = await js.key_value(clusterstate.bucket_name(config))
    assert await clusterstate.read_all(kv) == {"a": clusterstate.default_message("a")}
    capsys.readouterr()
    for name in _streams(config):
        await js.delete_stream(name)
