"""``first nats-auth --out DIR``: NATS users and permissions for a site's own nats-server.

Writes one nkey seed per role into ``DIR/credentials/`` (gateway, router, scaler, each worker slot
``<cluster>-n<i>``, each ``nats.clients`` entry, ops, admin) and ``DIR/nats-server.conf`` with the
users and what each may do (shared/natsauth.py). Seeds already there are kept, so running it again
after adding a client or a cluster only adds users; reload the server (``nats-server --signal
reload``) to apply. docs/security.md says which seed goes where. With ``--leaf-port``, the
server is a hub for one leaf node per cluster (services/admin/leafnodes.py, docs/federation.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.admin import leafnodes
from shared import config as cfg
from shared import natsauth


async def main(config: cfg.Config, args: argparse.Namespace) -> int:
    out = Path(args.out)
    store = args.store_dir or str((out / "jetstream").resolve())
    conf = out / "nats-server.conf"
    if getattr(args, "leaf_port", 0):  # a hub for leaf nodes, and a leaf config per cluster
        credentials = leafnodes.write(config, args, out, store)
        for cluster in config.clusters:
            print(f"wrote {out / f'leaf-{cluster.name}.conf'} (leaf node of {cluster.name})")
    else:
        credentials = natsauth.write_credentials(out / "credentials", natsauth.roles(config))
        conf.write_bytes(natsauth.server_config(credentials, host=args.host, port=args.port, store_dir=store))
    print(f"wrote {conf} and {len(credentials.roles)} seeds in {credentials.directory}:")
    for role in credentials.roles:
        print(f"  {role.kind:8} {credentials.seed_file(role.name)}")
    return 0
