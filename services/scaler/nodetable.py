"""The scaler's node table: every node it asked a provider for, in memory and in JetStream KV.

The bucket (shared/natsauth.scaler_bucket) holds one ``node.<node_id>`` entry per node
(schema.NodeEntry) besides the lease. The acting scaler writes an entry whenever what it shows
changes; a scaler that takes over (restarted, or a standby) reads them all and adopts the nodes,
so no node is started twice and none is forgotten. Gateways (/jobs) and ``first status`` read it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from services.scaler.providers.base import NodeProvider, NodeSpec
from shared import kvbucket, nodes, schema
from shared.supervise import Throttle

PREFIX = nodes.PREFIX
_DETAIL_FIELDS = ("job_id", "job_state", "host", "nodes_reserved", "estimated_start")


@dataclass
class NodeRecord:
    spec: NodeSpec
    provider: NodeProvider | None  # None: its cluster has no provider here (its workers are drained)
    state: schema.NodeState
    requested_at: float  # monotonic
    reason: str = ""
    details: dict = field(default_factory=dict)  # the provider's details(): job id, host ...
    written: bytes = b""  # the entry as last written, so unchanged entries are not rewritten
    heard: bool = False  # a worker of the node has sent a heartbeat
    last_heard: float = 0.0  # monotonic: when one of its workers was last in the book
    requested_unix: float = field(default_factory=lambda: round(time.time(), 3))

    @property
    def provider_name(self) -> str:
        return self.provider.name if self.provider is not None else ""

    def entry(self) -> schema.NodeEntry:
        d = self.details
        estimated = d.get("estimated_start")
        return schema.NodeEntry(
            node_id=self.spec.node_id,
            model=self.spec.model,
            cluster=self.spec.cluster,
            provider=self.provider_name,
            state=self.state,
            workers=list(self.spec.worker_ids),
            reason=self.reason[:4096],
            requested_at=self.requested_unix,
            walltime_s=self.spec.walltime_s
            if self.spec.walltime_s is not None
            else _seconds(d.get("walltime")),
            job_id=str(d.get("job_id", ""))[:512],
            job_state=str(d.get("job_state", ""))[:64],
            host=str(d.get("host", ""))[:512],
            nodes_reserved=_count(d.get("nodes_reserved"), 1),
            estimated_start=float(estimated)
            if isinstance(estimated, int | float) and 0 <= estimated <= 1e11
            else None,
        )


def _seconds(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and 0 <= value <= 1e9 else None


def _count(value: object, default: int) -> int:
    return value if isinstance(value, int) and 0 <= value <= 1_000_000_000 else default


def record_of(entry: schema.NodeEntry, provider: NodeProvider | None) -> NodeRecord:
    """A record for an entry another scaler wrote: its start time on this host's clock."""
    spec = NodeSpec(
        node_id=entry.node_id,
        model=entry.model,
        cluster=entry.cluster,
        workers=tuple(entry.workers),
        walltime_s=entry.walltime_s,
    )
    age = max(0.0, time.time() - entry.requested_at) if entry.requested_at else 0.0
    details = {k: getattr(entry, k) for k in _DETAIL_FIELDS if getattr(entry, k) not in ("", None)}
    record = NodeRecord(spec, provider, entry.state, time.monotonic() - age, entry.reason, details)
    record.requested_unix = entry.requested_at
    return record


class NodeTable:
    def __init__(self, kv: KeyValue):
        self.kv = kv
        self._throttle = Throttle()
        self._log = structlog.get_logger().bind(service="scaler")

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str, replicas: int = 0) -> NodeTable:
        """The table's bucket, created or brought in line with ``replicas`` copies (0: left as is)."""
        kv = await kvbucket.open_bucket(
            js, bucket, create=True, description="FIRST scaler: node table and lease", replicas=replicas
        )
        return cls(kv)

    async def load(self) -> list[schema.NodeEntry]:
        """Every node entry; entries that do not decode are left out."""
        entries, _ = await kvbucket.snapshot(self.kv, timeout_s=5.0)
        return nodes.decode_entries(entries.items())

    async def save(self, record: NodeRecord) -> None:
        """Write the record's entry if what it shows changed."""
        entry = record.entry()
        data = schema.encode(entry)
        if data == record.written:
            return
        key = PREFIX + record.spec.node_id
        try:
            await self.kv.put(key, schema.encode(_stamped(entry)))
            record.written = data
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            if self._throttle("save"):
                self._log.warning("node_table_write_failed", node_id=record.spec.node_id, error=repr(exc))

    async def remove(self, node_id: str) -> None:
        try:
            await self.kv.delete(PREFIX + node_id)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            if self._throttle("remove"):
                self._log.warning("node_table_write_failed", node_id=node_id, error=repr(exc))


def _stamped(entry: schema.NodeEntry) -> schema.NodeEntry:
    return msgspec.structs.replace(entry, updated=round(time.time(), 3))
