"""The copies JetStream keeps of a store the stack made (docs/federation.md, "JetStream replicas").

A store is created with the copies its setting asks for (``nats.jetstream_replicas`` where it has
none of its own). At start, whoever keeps it brings an existing store's copies in line: the scaler
its node table, the gateway and the batch service the batch stores, ``first cluster maintenance``
its bucket. Where the server cannot keep them (it is not clustered, or has fewer servers than
copies) or refuses the change, the store is made with one copy or stays as it is, with a warning
that names it: the stack runs on with the copies it has rather than not at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.js.client import JetStreamContext

T = TypeVar("T")

# The server's "not that many copies here" (nats-server's errors.json): no suitable peers,
# insufficient resources, replicas > 1 not supported in non-clustered mode.
_CANNOT_KEEP = frozenset({10005, 10023, 10074})


async def create_store(make: Callable[[int], Awaitable[T]], replicas: int, *, store: str) -> T:
    """``make(replicas)``: the store created with that many copies; where the server cannot keep
    them, ``make(1)`` and a warning naming ``store``."""
    try:
        return await make(replicas)
    except nats.js.errors.APIError as exc:
        if replicas <= 1 or exc.err_code not in _CANNOT_KEEP:
            raise
        _warn(store, replicas, exc)
    return await make(1)


async def bring_in_line(js: JetStreamContext, stream: str, replicas: int, *, store: str) -> None:
    """Give ``stream`` (a KV bucket's ``KV_<bucket>``, an object store's ``OBJ_<bucket>``, or a
    plain stream) ``replicas`` copies if it has others; ``store`` names it in the warning."""
    try:
        info = await js.stream_info(stream)
        if (info.config.num_replicas or 1) == replicas:
            return
        await js.update_stream(dataclasses.replace(info.config, num_replicas=replicas))
    except (nats.errors.Error, TimeoutError) as exc:
        _warn(store, replicas, exc, stream=stream)
        return
    structlog.get_logger().info("jetstream_replicas_changed", store=store, stream=stream, replicas=replicas)


def _warn(store: str, replicas: int, exc: Exception, **fields) -> None:
    structlog.get_logger().warning(
        "jetstream_replicas_unchanged",
        store=store,
        replicas=replicas,
        error=getattr(exc, "description", None) or str(exc) or repr(exc),
        **fields,
    )
