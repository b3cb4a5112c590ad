"""``first cluster list`` and ``first cluster maintenance NAME on|off [--message ...]``: clusters
under maintenance, in the JetStream KV bucket every router and gateway follows
(shared/clusterstate.py). A change takes effect everywhere within about a second.

Every failure is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

import msgspec
import nats.errors
import nats.js.errors

from services.admin import target
from services.admin.target import CommandError
from shared import clusterstate
from shared import config as cfg
from shared.connect import ConnectFailed

_TIMEOUT_S = 5.0


async def main(config: cfg.Config, args: argparse.Namespace) -> int:
    return await target.one_line("first cluster", _run(config, args))


async def _run(config: cfg.Config, args: argparse.Namespace) -> int:
    if args.action == "maintenance" and config.cluster(args.name) is None:
        known = ", ".join(c.name for c in config.clusters) or "none"
        raise CommandError(f"no cluster is named {args.name!r} in the config (clusters: {known})")
    try:
        nc, url = await target.connect(config, args, "first-cluster")
    except ConnectFailed as exc:
        raise CommandError(str(exc)) from None
    bucket = clusterstate.bucket_name(config)
    try:
        js = nc.jetstream(timeout=_TIMEOUT_S)
        if args.action == "list":
            return await _list(js, bucket, config, args)
        return await _maintenance(js, bucket, args, config.nats.jetstream_replicas)
    except nats.js.errors.ServiceUnavailableError:
        raise CommandError(f"the NATS server at {url} has JetStream off: maintenance needs it") from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise CommandError(f"NATS at {url} failed: {str(exc) or type(exc).__name__}") from None
    finally:
        await nc.close()


async def _list(js, bucket: str, config: cfg.Config, args: argparse.Namespace) -> int:
    kv = await clusterstate.open_bucket(js, bucket, create=False)
    found = {} if kv is None else await clusterstate.read_all(kv, timeout_s=_TIMEOUT_S)
    rows = [
        {
            "name": c.name,
            "state": "maintenance" if c.name in found else "in service",
            "message": found.get(c.name, ""),
        }
        for c in config.clusters
    ]
    if args.json:
        for row in rows:
            sys.stdout.buffer.write(msgspec.json.encode(row) + b"\n")
        return 0
    table = [["CLUSTER", "STATE", "MESSAGE"]] + [[r["name"], r["state"], r["message"]] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


async def _maintenance(js, bucket: str, args: argparse.Namespace, replicas: int) -> int:
    if args.state == "on":
        kv = await clusterstate.open_bucket(js, bucket, create=True, replicas=replicas)
        message = args.message or clusterstate.default_message(args.name)
        await clusterstate.set_maintenance(kv, args.name, message)
        print(f"Cluster {args.name} is under maintenance: requests pinned to it get 503 ({message})")
        return 0
    kv = await clusterstate.open_bucket(js, bucket, create=False)
    if kv is not None:
        await clusterstate.clear_maintenance(kv, args.name)
    print(f"Cluster {args.name} is in service.")
    return 0
