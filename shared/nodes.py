"""The scaler's node table as its readers see it: gateways' ``/resource_server/<cluster>/jobs`` and
``first status``. The scaler writes it (services/scaler/nodetable.py): one ``node.<node_id>``
entry per node (schema.NodeEntry) in the bucket shared/natsauth.scaler_bucket names.

A node is shown as FIRST shows a PBS job (qstat's fields: Models, Framework, Job ID, Job State,
Host Name, Nodes Reserved, Walltime, Estimated Start Time, Model Status), its model status
coming from its workers' heartbeats where the node runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext

from shared import kvbucket, schema

PREFIX = "node."  # the node entries' keys; the lease is "lease"
_READ_TIMEOUT_S = 2.0


async def read_nodes(js: JetStreamContext, bucket: str) -> list[schema.NodeEntry]:
    """Every node entry (empty if no scaler ever ran); entries that do not decode are left out."""
    kv = await kvbucket.open_bucket(js, bucket, create=False, description="")
    if kv is None:
        return []
    return decode_entries((await kvbucket.snapshot(kv, timeout_s=_READ_TIMEOUT_S))[0].items())


def decode_entries(items: Iterable[tuple[str, object]]) -> list[schema.NodeEntry]:
    out = []
    for key, entry in items:
        if not key.startswith(PREFIX):
            continue
        try:
            out.append(schema.node_entry_decoder.decode(entry.value or b""))
        except Exception:  # msgspec errors: garbage someone wrote; the others still show
            continue
    return sorted(out, key=lambda e: (e.cluster, e.model, e.requested_at, e.node_id))


async def try_read_nodes(js: JetStreamContext, bucket: str) -> list[schema.NodeEntry] | None:
    """``read_nodes``, or None if JetStream cannot be read (not allowed, not there, timing out)."""
    try:
        return await read_nodes(js, bucket)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError):
        return None


def model_status(entry: schema.NodeEntry, worker_states: dict[str, str]) -> str:
    """FIRST's words for a node: running (a worker of it is ready), starting (it runs, its
    workers load), queued (the batch system holds it), stopping, failed."""
    if entry.state in ("requested", "queued"):
        return "queued"
    if entry.state == "running":
        states = [worker_states.get(w, "") for w in entry.workers]
        return "running" if "ready" in states else "starting"
    return entry.state


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def job_info(entry: schema.NodeEntry, framework: str, status: str) -> dict:
    """The node as one of FIRST's JobInfo entries (``/jobs``)."""
    job = {
        "Models": entry.model,
        "Framework": framework,
        "Cluster": entry.cluster,
        "Model Status": status,
        "Job ID": entry.job_id or entry.node_id,
        "Job State": entry.job_state or ("Q" if status == "queued" else "R"),
        "Node ID": entry.node_id,
        "Workers": ",".join(entry.workers),
        "Nodes Reserved": entry.nodes_reserved,
    }
    if entry.host:
        job["Host Name"] = entry.host
    if entry.reason:
        job["Job Comments"] = entry.reason
    if entry.walltime_s is not None:
        job["Walltime"] = _clock(entry.walltime_s)
    if entry.estimated_start is not None:
        job["Estimated Start Time"] = time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry.estimated_start)
        )
    return job
