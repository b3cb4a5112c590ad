"""``first status [--watch [SECONDS]] [--json]``: the deployment as the routers see it, for an
operator at a terminal: each model (status, workers, slots in use, queued, nodes starting) and
each cluster (workers, slots in use, maintenance), asked of one router over NATS; the scaler's
nodes (batch jobs) from its node table in JetStream KV.

Every failure is one line on stderr and exit status 2; with ``--watch`` a failed refresh is shown
in place of the tables and the watch goes on (the routers may be restarting).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

import msgspec
import nats.errors
import orjson
from nats.aio.client import Client as NATS

from services.admin import events as admin_events
from services.admin import target
from shared import clusterstate, errors, events, natsauth, nodes, schema, streams
from shared import config as cfg
from shared.connect import ConnectFailed
from shared.subjects import Subjects

_TIMEOUT_S = 3.0
_EVENTS = 8  # the newest events shown


class Failed(Exception):
    """What went wrong, in one line for the operator."""


async def main(config: cfg.Config, args: argparse.Namespace) -> int:
    try:
        nc, _url = await target.connect(config, args, "first-status")
    except ConnectFailed as exc:
        print(f"first status: {exc}", file=sys.stderr)
        return 2
    try:
        if args.watch is None:
            return _show(await _snapshot(nc, config), args)
        while True:
            try:
                view = await _snapshot(nc, config)
            except Failed as exc:
                view = {"error": str(exc)}
            sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "")
            _show(view, args)
            sys.stdout.flush()
            await asyncio.sleep(args.watch)
    except Failed as exc:
        print(f"first status: {exc}", file=sys.stderr)
        return 2
    finally:
        with contextlib.suppress(nats.errors.Error):
            await nc.close()


async def _snapshot(nc: NATS, config: cfg.Config) -> dict:
    try:
        msg = await nc.request(
            Subjects(config.nats.subject_prefix).status,
            schema.encode(schema.StatusRequest()),
            timeout=_TIMEOUT_S,
        )
        reply = schema.status_reply_decoder.decode(msg.data)
    except nats.errors.NoRespondersError:
        raise Failed("no router is running") from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise Failed(f"no answer from a router: {str(exc) or type(exc).__name__}") from None
    except msgspec.DecodeError as exc:
        raise Failed(f"a router sent an undecodable status: {exc}") from None
    return {"at": time.time(), "router_id": reply.router_id, "models": _models(reply),
            "clusters": _clusters(reply, config, await _maintenance(nc, config)),
            "nodes": await _nodes(nc, config, reply),
            "events": await _events(nc, config)}  # fmt: skip


async def _events(nc: NATS, config: cfg.Config) -> list[dict]:
    """The newest operator events (shared/events.py), or none where the stream cannot be read."""
    try:
        return [msgspec.to_builtins(e) for e in await events.newest(nc, config, _EVENTS)]
    except (nats.errors.Error, TimeoutError, streams.StreamError):
        return []


async def _maintenance(nc: NATS, config: cfg.Config) -> dict[str, str]:
    try:
        kv = await clusterstate.open_bucket(
            nc.jetstream(timeout=_TIMEOUT_S), clusterstate.bucket_name(config), create=False
        )
        return {} if kv is None else await clusterstate.read_all(kv)
    except (nats.errors.Error, TimeoutError, errors.FirstError):
        return {}  # JetStream off, or no permission to read it: not shown


async def _nodes(nc: NATS, config: cfg.Config, reply: schema.StatusReply) -> list[dict]:
    """The scaler's nodes (its node table), each in FIRST's job fields (shared/nodes.py); none
    where the table cannot be read (no scaler yet, no permission)."""
    table = await nodes.try_read_nodes(nc.jetstream(timeout=_TIMEOUT_S), natsauth.scaler_bucket(config))
    states = {w.worker_id: w.state for m in reply.models for w in m.workers}
    out = []
    for entry in table or []:
        model = config.model(entry.model)
        framework = model.framework if model is not None else ""
        out.append(nodes.job_info(entry, framework, nodes.model_status(entry, states)))
    return out


def _models(reply: schema.StatusReply) -> list[dict]:
    return [
        {
            "model": m.id,
            "status": m.state,
            "workers": len(m.workers),
            "slots_in_use": sum(w.in_flight for w in m.workers),
            "slots": sum(w.capacity for w in m.workers),
            "queued": m.queued,
            "nodes_starting": m.nodes_starting,
        }
        for m in reply.models
    ]


def _clusters(reply: schema.StatusReply, config: cfg.Config, maintenance: dict[str, str]) -> list[dict]:
    rows = {c.name: {"cluster": c.name, "workers": 0, "slots_in_use": 0, "slots": 0, "max_nodes": c.max_nodes,
                     "maintenance": maintenance.get(c.name)} for c in config.clusters}  # fmt: skip
    for m in reply.models:
        for w in m.workers:
            row = rows.setdefault(w.cluster, {"cluster": w.cluster, "workers": 0, "slots_in_use": 0, "slots": 0,
                                              "max_nodes": 0, "maintenance": None})  # fmt: skip
            row["workers"] += 1
            row["slots_in_use"] += w.in_flight
            row["slots"] += w.capacity
    return list(rows.values())


def _show(view: dict, args: argparse.Namespace) -> int:
    if args.json:
        print(orjson.dumps(view).decode())
        return 0
    if "error" in view:
        print(f"first status: {view['error']}")
        return 0
    stamp = time.strftime("%H:%M:%S", time.localtime(view["at"]))
    print(f"{stamp}  router {view['router_id']}\n")
    print(_table(["MODEL", "STATUS", "WORKERS", "SLOTS", "QUEUED", "STARTING"],
                 [[m["model"], m["status"], m["workers"], f"{m['slots_in_use']}/{m['slots']}", m["queued"],
                   m["nodes_starting"]] for m in view["models"]]))  # fmt: skip
    print()
    print(_table(["CLUSTER", "WORKERS", "SLOTS", "NODES", "MAINTENANCE"],
                 [[c["cluster"], c["workers"], f"{c['slots_in_use']}/{c['slots']}", f"{c['workers']}/{c['max_nodes']}",
                   c["maintenance"] or "-"] for c in view["clusters"]]))  # fmt: skip
    if view.get("nodes"):
        print()
        print(_table(["NODE", "MODEL", "CLUSTER", "STATUS", "JOB", "STATE", "HOST", "WORKERS", "WALLTIME",
                      "REASON"],
                     [[n["Node ID"], n["Models"], n["Cluster"], n["Model Status"], n["Job ID"], n["Job State"],
                       n.get("Host Name", "-"), n["Workers"], n.get("Walltime", "-"),
                       n.get("Job Comments", "-")[:60]] for n in view["nodes"]]))  # fmt: skip
    if view.get("events"):
        print("\nNEWEST EVENTS")
        for e in view["events"]:
            print(admin_events.line(msgspec.convert(e, schema.Event), colour=sys.stdout.isatty()))
    return 0


def _table(titles: list[str], rows: list[list]) -> str:
    cells = [titles, *([str(x) for x in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(titles))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)
