"""Opening a JetStream KV bucket the stack keeps its state in (API keys, clusters under maintenance)."""

from __future__ import annotations

import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue


async def open_bucket(
    js: JetStreamContext, bucket: str, *, create: bool, description: str, replicas: int = 0
) -> KeyValue | None:
    """The bucket; if missing, created (``create``: one revision per key, on file, ``replicas``
    copies, 0 meaning 1) or None. Two processes that create it at once both succeed: JetStream
    accepts a second creation with the same configuration."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            return None
    return await js.create_key_value(
        api.KeyValueConfig(
            bucket=bucket,
            description=description,
            history=1,
            storage=api.StorageType.FILE,
            replicas=replicas or 1,
        )
    )
