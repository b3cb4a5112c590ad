"""The usage stream: JetStream keeps every UsageRecord that workers publish on ``<p>.v1.usage``.

Workers publish on core NATS, as before: the stream captures the subject, so the request path
waits on no JetStream acknowledgement (one costs ~0.2 ms, more under load). Each record carries
``Nats-Msg-Id: <request_id>:<attempt>``, so a record sent twice within the duplicate window is
stored once: one record per run. ``first up`` and every ``first router`` create the stream at start,
or bring its limits in line with the config; ``first usage`` reads it (services/admin/usage.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from nats.aio.client import Client as NATS
from nats.js import api

from shared import config as cfg
from shared import streams
from shared.schema import run_key
from shared.subjects import Subjects

MSG_ID = api.Header.MSG_ID.value
# Long enough to cover a re-send of the same record (a reconnect, a retried publish), short
# enough that the server's table of recent ids stays small.
DUPLICATE_WINDOW_S = 120.0
DAY_S = 86_400.0

UsageStreamError = streams.StreamError
StreamNotFound = streams.StreamNotFound
Stored = streams.Stored


def stream_name(config: cfg.Config) -> str:
    """``usage.stream``, else from the prefix: ``first`` -> ``FIRST_USAGE``, ``anl.first`` ->
    ``ANL_FIRST_USAGE`` (stream names may not hold dots)."""
    return config.usage.stream or config.nats.subject_prefix.replace(".", "_").upper() + "_USAGE"


def msg_id(request_id: str, attempt: int) -> str:
    """The ``Nats-Msg-Id`` of a run's record: the same run's record is stored once."""
    return run_key(request_id, attempt)


def stream_config(config: cfg.Config) -> api.StreamConfig:
    max_age = config.usage.retention_days * DAY_S
    return api.StreamConfig(
        name=stream_name(config),
        description="FIRST usage records, one per run of a request on a worker",
        subjects=[Subjects(config.nats.subject_prefix).usage],
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        storage=api.StorageType.FILE,
        max_age=max_age,
        duplicate_window=min(DUPLICATE_WINDOW_S, max_age),  # the server refuses a longer one
        num_replicas=config.usage.replicas or 1,
    )


async def ensure(nc: NATS, config: cfg.Config) -> api.StreamInfo:
    """Create the stream, or update its retention and duplicate window to the config's."""
    return await streams.ensure(
        nc, stream_config(config), name_setting="usage.stream", replicas=config.usage.replicas
    )


def read(nc: NATS, config: cfg.Config, since: float) -> AsyncIterator[Stored]:
    """Every record stored at or after ``since`` (Unix seconds), oldest first."""
    return streams.read(
        nc, stream_name(config), since, what="usage", creator="`first up` or a `first router`"
    )
