"""Clusters under maintenance: a JetStream KV bucket, written by ``first cluster maintenance`` and
followed by every router and gateway.

One entry per cluster under maintenance, keyed by the cluster's name, holding the operator's
message; ``off`` deletes it. Routers then send federated requests elsewhere while another cluster
can serve (docs/protocol.md, "How a router chooses"); gateways answer requests pinned to it with
503 ``cluster_under_maintenance`` and the message, and show it so in FIRST's /status and /jobs.

Followers load the whole bucket once a second rather than keep a watch (as the key bucket's
follower does, services/gateway/auth/keys.py): the bucket holds one small entry per cluster at
most, a reload is one short-lived ordered consumer, and it needs no repair after a NATS restart,
a lost consumer or a recreated bucket. A change reaches every follower within about a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from shared import config as cfg
from shared import kvbucket, natsauth
from shared.children import cancel_and_wait
from shared.supervise import Throttle

RELOAD_S = 1.0
MAX_MESSAGE = 1024


class Maintenance(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One cluster's entry. Unknown fields pass (a newer ``first cluster`` may add some)."""

    message: str = ""
    since: float = 0.0  # unix seconds


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Maintenance)


def bucket_name(config: cfg.Config) -> str:
    """``<subject prefix>_clusters``, with the prefix's dots as ``_`` (its readers' permissions
    name it too)."""
    return natsauth.clusters_bucket(config)


def default_message(cluster: str) -> str:
    return f"The cluster '{cluster}' is under maintenance: try again later or use another cluster."


async def open_bucket(
    js: JetStreamContext, bucket: str, *, create: bool, replicas: int = 0
) -> KeyValue | None:
    """The bucket; if missing, created (``create``) or None. With ``create``, ``replicas``
    (``nats.jetstream_replicas``) copies, an existing bucket's brought in line."""
    description = "FIRST clusters under maintenance (first cluster maintenance)"
    return await kvbucket.open_bucket(js, bucket, create=create, description=description, replicas=replicas)


async def read_all(kv: KeyValue, *, timeout_s: float = 5.0) -> dict[str, str]:
    """Every cluster under maintenance, with its message."""
    return (await _read(kv, timeout_s))[0]


async def _read(kv: KeyValue, timeout_s: float) -> tuple[dict[str, str], int]:
    """The clusters under maintenance and the bucket's sequence number they are up to date with."""
    entries, last = await kvbucket.snapshot(kv, timeout_s=timeout_s)
    found: dict[str, str] = {}
    for key, entry in entries.items():
        try:
            record = _decoder.decode(entry.value or b"")
        except (msgspec.ValidationError, msgspec.DecodeError):
            record = Maintenance()  # unreadable: still under maintenance, which is the safe side
        found[key] = record.message[:MAX_MESSAGE] or default_message(key)
    return found, last


async def set_maintenance(kv: KeyValue, cluster: str, message: str) -> None:
    await kv.put(cluster, _encoder.encode(Maintenance(message=message[:MAX_MESSAGE], since=time.time())))


async def clear_maintenance(kv: KeyValue, cluster: str) -> None:
    await kv.delete(cluster)


class MaintenanceFollower:
    """The bucket as last read (``clusters``: name -> message), reloaded every RELOAD_S. A failed
    reload keeps the last state; a missing bucket means no cluster is under maintenance."""

    def __init__(
        self, nc: NATS, config: cfg.Config, on_change: Callable[[dict[str, str]], None] | None = None
    ):
        self.nc = nc
        self.bucket = bucket_name(config)
        self.known = {c.name for c in config.clusters}
        self.clusters: dict[str, str] = {}
        self.on_change = on_change
        self._task: asyncio.Task | None = None
        self._noise = Throttle()
        self._last_seq = -1  # the bucket's last entry when it was last read

    def message(self, cluster: str) -> str | None:
        """The operator's message if the cluster is under maintenance, else None."""
        return self.clusters.get(cluster)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="maintenance-follow")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def reload(self) -> None:
        kv = await open_bucket(self.nc.jetstream(timeout=5.0), self.bucket, create=False)
        found: dict[str, str] = {}
        self._last_seq, last = -1, self._last_seq
        if kv is not None:
            # A stream info each second; the entries (a consumer to read them) only on a change.
            if (await kv.status()).stream_info.state.last_seq == last:
                self._last_seq = last
                return
            found, self._last_seq = await _read(kv, 5.0)
        found = {name: msg for name, msg in found.items() if name in self.known}
        if found != self.clusters:
            structlog.get_logger().info("maintenance_changed", clusters=sorted(found))
            self.clusters = found
            if self.on_change is not None:
                self.on_change(found)

    async def _follow(self) -> None:
        while True:
            try:
                await self.reload()
            except Exception as exc:  # NATS down, JetStream off, no permission: retried, last state kept
                if self._noise("reload"):
                    structlog.get_logger().warning(
                        "maintenance_reload_failed", bucket=self.bucket, error=repr(exc), note="once a minute"
                    )
            await asyncio.sleep(RELOAD_S)
