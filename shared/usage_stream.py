"""The usage stream: JetStream keeps every UsageRecord that workers publish on ``<p>.v1.usage``.

Workers publish on core NATS, as before: the stream captures the subject, so the request path
waits on no JetStream acknowledgement (one costs ~0.2 ms, more under load). Each record carries
``Nats-Msg-Id: <request_id>:<attempt>``, so a record sent twice within the duplicate window is
stored once: one record per run. ``first up`` and every ``first router`` create the stream at start,
or bring its limits in line with the config; ``first usage`` reads it (services/admin/usage.py).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import AsyncIterator
from typing import NamedTuple

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

from shared import config as cfg
from shared.schema import run_key
from shared.subjects import Subjects

MSG_ID = api.Header.MSG_ID.value
# Long enough to cover a re-send of the same record (a reconnect, a retried publish), short
# enough that the server's table of recent ids stays small.
DUPLICATE_WINDOW_S = 120.0
DAY_S = 86_400.0
API_TIMEOUT_S = 5.0
READ_BATCH = 1_000
# A reader's consumer vanishes this long after its reader does (a ``first usage`` killed midway).
READER_INACTIVE_S = 60.0

# JetStream API error codes (nats-server's errors.json).
_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"
_STREAM_NOT_FOUND = 10059
_SUBJECTS_OVERLAP = 10065


class UsageStreamError(Exception):
    """The stream cannot be created, updated or read; the message says why, in one line."""


class StreamNotFound(UsageStreamError):
    pass


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
    """Create the stream, or update its retention and duplicate window to the config's; safe to
    run from several processes at once (identical creates succeed, identical updates too)."""
    js = nc.jetstream(timeout=API_TIMEOUT_S)
    want = stream_config(config)
    try:
        try:
            return await js.add_stream(want)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == _SUBJECTS_OVERLAP:
                raise UsageStreamError(
                    f"another stream already stores {want.subjects[0]}: set usage.stream to its name"
                ) from None
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
        info = await js.stream_info(want.name)
        have = info.config
        if have.subjects != want.subjects:
            raise UsageStreamError(
                f"stream {want.name} stores {', '.join(have.subjects or [])}, not {want.subjects[0]}:"
                " set usage.stream to another name"
            )
        if have.storage != want.storage:
            raise UsageStreamError(
                f"stream {want.name} keeps its records in memory, not on file: JetStream cannot"
                " change that; move them to a new stream"
            )
        # Replicas are ours only where the config names them; else an operator's stay.
        replicas = config.usage.replicas or have.num_replicas
        if (have.max_age, have.duplicate_window, have.num_replicas) == (
            want.max_age,
            want.duplicate_window,
            replicas,
        ):
            return info
        # Only our limits change: whatever else an operator set (max_bytes, placement) stays.
        return await js.update_stream(
            dataclasses.replace(
                have, max_age=want.max_age, duplicate_window=want.duplicate_window, num_replicas=replicas
            )
        )
    except nats.js.errors.ServiceUnavailableError:
        raise UsageStreamError(_no_jetstream(want.name)) from None
    except nats.js.errors.APIError as exc:
        raise UsageStreamError(f"stream {want.name}: {exc.description or exc}") from None
    except nats.errors.TimeoutError:
        raise UsageStreamError(
            f"stream {want.name}: JetStream did not answer in {API_TIMEOUT_S:g} s"
        ) from None


class Stored(NamedTuple):
    """One message of the stream: its sequence number, when the server stored it, its bytes."""

    seq: int
    time: float
    data: bytes


async def read(nc: NATS, config: cfg.Config, since: float) -> AsyncIterator[Stored]:
    """Every message stored at or after ``since`` (Unix seconds), oldest first, up to those stored
    when reading began. An ephemeral pull consumer, deleted at the end, serves them in batches."""
    js = nc.jetstream(timeout=API_TIMEOUT_S)
    name = stream_name(config)
    consumer = api.ConsumerConfig(
        description="first usage",
        deliver_policy=api.DeliverPolicy.BY_START_TIME,
        opt_start_time=datetime.datetime.fromtimestamp(since, datetime.UTC),
        ack_policy=api.AckPolicy.NONE,
        inactive_threshold=READER_INACTIVE_S,
        mem_storage=True,
        num_replicas=1,
    )
    try:
        info = await js.add_consumer(name, consumer)
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == _STREAM_NOT_FOUND:
            raise StreamNotFound(
                f"no usage stream {name} on this NATS server: `first up` or a `first router` creates it"
            ) from None
        raise UsageStreamError(f"stream {name}: {exc.description or exc}") from None
    except nats.js.errors.ServiceUnavailableError:
        raise UsageStreamError(_no_jetstream(name)) from None
    except nats.js.errors.APIError as exc:
        raise UsageStreamError(f"stream {name}: {exc.description or exc}") from None
    except nats.errors.TimeoutError:
        raise UsageStreamError(f"stream {name}: JetStream did not answer in {API_TIMEOUT_S:g} s") from None
    sub = await js.pull_subscribe_bind(consumer=info.name, stream=name)
    try:
        async for msg in _fetch_all(sub, info.num_pending or 0):
            meta = msg.metadata
            yield Stored(meta.sequence.stream, meta.timestamp.timestamp(), msg.data)
    finally:
        await sub.unsubscribe()
        try:
            await js.delete_consumer(name, info.name)
        except (nats.errors.Error, TimeoutError):
            pass  # the server removes it after READER_INACTIVE_S anyway


async def _fetch_all(sub: JetStreamContext.PullSubscription, pending: int) -> AsyncIterator:
    stalls = 0
    while pending > 0:
        try:
            msgs = await sub.fetch(min(pending, READ_BATCH), timeout=API_TIMEOUT_S)
        except nats.errors.TimeoutError:
            # Records counted at the start may have aged out since: ask what is left.
            pending = (await sub.consumer_info()).num_pending or 0
            stalls += 1
            if pending and stalls >= 3:
                raise UsageStreamError(f"reading stalled with {pending} records left") from None
            continue
        stalls = 0
        pending -= len(msgs)
        for msg in msgs:
            yield msg


def _no_jetstream(name: str) -> str:
    return f"stream {name}: JetStream is not enabled on this NATS server (run nats-server with -js)"
