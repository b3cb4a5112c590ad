"""``first nats-auth --leaf-port 7422``: a hub that accepts leaf nodes, and one leaf node config per
cluster (docs/federation.md).

Beside what ``first nats-auth`` always writes, this adds a ``leaf-<cluster>`` user to the hub (the
user a site's leaf node connects as, allowed only that cluster's worker subjects), a leaf node
listener and a JetStream domain to ``nats-server.conf``, and ``leaf-<cluster>.conf`` for each
cluster: that site's worker slots as local users and the outbound link to the hub. A leaf config
holds its site's ``leaf-<cluster>`` seed, so it is written readable by its owner only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from shared import config as cfg
from shared import natsauth


def roles(config: cfg.Config) -> list[natsauth.Role]:
    """Every user of the hub: those of ``first nats-auth`` and one ``leaf-<cluster>`` per cluster."""
    sites = [natsauth.leaf_role(config, c.name, [c.name]) for c in config.clusters]
    return natsauth.roles(config) + sites


def write(config: cfg.Config, args: argparse.Namespace, out: Path, store: str) -> natsauth.Credentials:
    credentials = natsauth.write_credentials(out / "credentials", roles(config))
    hub = natsauth.hub_server_config(
        credentials,
        host=args.host,
        port=args.port,
        store_dir=store,
        leaf_host=args.host,
        leaf_port=args.leaf_port,
    )
    (out / "nats-server.conf").write_bytes(hub)
    hub_urls = args.hub_url or [f"nats-leaf://{args.host}:{args.leaf_port}"]
    for cluster in config.clusters:
        workers = natsauth.Credentials(
            credentials.directory, natsauth.site_worker_roles(config, [cluster.name])
        )
        seed = credentials.seed_file(natsauth.leaf_user(cluster.name)).read_bytes()
        text = natsauth.leaf_server_config(
            workers, seed, host=args.leaf_host, port=args.leaf_client_port, hub_urls=hub_urls
        )
        _write_private(out / f"leaf-{cluster.name}.conf", text)
    return credentials


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(0o600)
