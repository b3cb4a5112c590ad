"""Opening a JetStream KV bucket the stack keeps its state in (API keys, clusters under maintenance)."""

from __future__ import annotations

import contextlib
import time

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from shared.replicas import bring_in_line, create_store

# How long to wait for entries nats-py delivers after its "no more" marker (see snapshot).
_STRAGGLER_S = 0.25


async def open_bucket(
    js: JetStreamContext, bucket: str, *, create: bool, description: str, replicas: int = 0, ttl: float = 0.0
) -> KeyValue | None:
    """The bucket; if missing, created (``create``: one revision per key, on file, ``replicas``
    copies, 0 meaning 1, entries kept ``ttl`` seconds, 0 meaning for ever) or None. Two processes that create it at once both succeed: JetStream
    accepts a second creation with the same configuration. With ``create`` and ``replicas``, an
    existing bucket's copies are brought in line (shared/replicas.py: a warning where they cannot)."""
    try:
        kv = await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            return None
    else:
        if create and replicas:
            await bring_in_line(js, f"KV_{bucket}", replicas, store=f"KV bucket {bucket}")
        return kv
    return await create_store(
        lambda n: js.create_key_value(
            api.KeyValueConfig(
                bucket=bucket,
                description=description,
                history=1,
                storage=api.StorageType.FILE,
                replicas=n,
                ttl=ttl or None,
            )
        ),
        replicas or 1,
        store=f"KV bucket {bucket}",
    )


async def snapshot(kv: KeyValue, *, timeout_s: float) -> tuple[dict[str, KeyValue.Entry], int]:
    """Every key's current entry (deleted keys left out) in one pass of a watch, and the sequence
    number the snapshot is complete up to (the bucket's last when the pass began, or less when
    the newest entries did not come: a caller that rereads when the bucket moves past it then
    rereads).

    nats-py can post its "no more entries" marker before an entry the server already delivered
    (JetStream answered the consumer info, nothing pending, before that entry reached the client:
    API replies and a consumer's deliveries leave the server by different paths), so a pass that
    stopped at the marker could miss the newest write for good in a follower that rereads only
    when the sequence moves. Entries are read until the one at the starting sequence has come, or,
    if that one is gone (purged), until no more arrive for a moment.
    """
    last = (await kv.status()).stream_info.state.last_seq
    found: dict[str, KeyValue.Entry] = {}
    seen = 0
    deadline = time.monotonic() + timeout_s
    watcher = await kv.watchall()
    try:
        marker = False
        while seen < last or not marker:
            wait = max(0.0, deadline - time.monotonic())
            if marker:
                wait = min(wait, _STRAGGLER_S)
            try:
                entry = await watcher.updates(timeout=wait)
            except (TimeoutError, nats.errors.TimeoutError):
                if marker:
                    break  # the newest entries were removed; what came is all there is
                raise
            if entry is None:
                marker = True
                continue
            seen = max(seen, entry.revision or 0)
            if entry.operation in (KV_DEL, KV_PURGE):
                found.pop(entry.key, None)
            else:
                found[entry.key] = entry
    finally:
        with contextlib.suppress(nats.errors.Error):
            await watcher.stop()
    return found, min(seen, last)
