"""``first services [--json]``: what answers NATS's service API for this deployment (its subject
prefix), as ``nats micro ls`` and ``nats micro stats`` would show it: each gateway, router, scaler
and worker with its instance id, version, host and pid, its own ids and its counters.

Failures are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse

import nats.errors
import orjson

from services.admin import target
from shared import config as cfg
from shared import discovery
from shared.connect import ConnectFailed, close

_SHOWN = ("router_id", "worker_id", "cluster", "model", "clusters")  # the metadata worth a column


async def main(config: cfg.Config, args: argparse.Namespace) -> int:
    return await target.one_line("first services", _run(config, args))


async def _run(config: cfg.Config, args: argparse.Namespace) -> int:
    try:
        nc, _url = await target.connect(config, args, "first-services")
    except ConnectFailed as exc:
        raise target.CommandError(str(exc)) from None
    prefix = config.nats.subject_prefix
    try:
        infos = await discovery.ask(nc, "INFO", prefix=prefix)
        stats = {s["id"]: s for s in await discovery.ask(nc, "STATS", prefix=prefix)}
    except nats.errors.Error as exc:
        raise target.CommandError(f"NATS: {str(exc) or type(exc).__name__}") from None
    finally:
        await close(nc)
    rows = [{**info, "stats": stats.get(info["id"])} for info in infos]
    if args.json:
        print(orjson.dumps(rows).decode())
        return 0
    if not rows:
        print(f"no service of the deployment '{prefix}' answered")
        return 0
    print(_table(["NAME", "ID", "VERSION", "HOST", "PID", "DETAILS", "COUNTERS"], [_row(r) for r in rows]))
    return 0


def _row(row: dict) -> list[str]:
    meta = row.get("metadata") or {}
    details = " ".join(f"{k}={meta[k]}" for k in _SHOWN if meta.get(k))
    endpoints = (row.get("stats") or {}).get("endpoints") or [{}]
    data = endpoints[0].get("data") or {}
    counters = " ".join(f"{k}={v}" for k, v in data.items() if isinstance(v, int | str))
    return [row["name"], row["id"], row.get("version", ""), meta.get("host", ""), meta.get("pid", ""),
            details or "-", counters or "-"]  # fmt: skip


def _table(titles: list[str], rows: list[list[str]]) -> str:
    cells = [titles, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(titles))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)
