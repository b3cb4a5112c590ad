"""The stack's JetStream streams (usage records, operator events): made sure of at start with the
config's limits, and read from a point in time.

Publishers use core NATS: a stream captures its subjects, so nobody on the request path waits on a
JetStream acknowledgement. ``first up`` and every ``first router`` create the streams, or bring
their limits in line with the config; admin commands read them.
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

API_TIMEOUT_S = 5.0
READ_BATCH = 1_000
# A reader's consumer vanishes this long after its reader does (a command killed midway).
READER_INACTIVE_S = 60.0

# JetStream API error codes (nats-server's errors.json).
_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"
_STREAM_NOT_FOUND = 10059
_SUBJECTS_OVERLAP = 10065


class StreamError(Exception):
    """A stream cannot be created, updated or read; the message says why, in one line."""


class StreamNotFound(StreamError):
    pass


# The limits ensure() keeps in line with the config (those ``want`` sets); whatever else an
# operator set stays.
_OURS = ("max_age", "max_bytes", "duplicate_window")


async def ensure(nc: NATS, want: api.StreamConfig, *, name_setting: str, replicas: int) -> api.StreamInfo:
    """Create the stream, or update its limits to ``want``'s; safe to run from several processes at
    once (identical creates succeed, identical updates too). ``name_setting`` is the config field
    that names the stream, for the errors; ``replicas`` 0 leaves an existing stream's as it is."""
    js = nc.jetstream(timeout=API_TIMEOUT_S)
    try:
        try:
            return await js.add_stream(want)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == _SUBJECTS_OVERLAP:
                raise StreamError(
                    f"another stream already stores {want.subjects[0]}: set {name_setting} to its name"
                ) from None
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
        info = await js.stream_info(want.name)
        have = info.config
        if have.subjects != want.subjects:
            raise StreamError(
                f"stream {want.name} stores {', '.join(have.subjects or [])}, not {want.subjects[0]}:"
                f" set {name_setting} to another name"
            )
        if have.storage != want.storage:
            raise StreamError(
                f"stream {want.name} keeps its messages in memory, not on file: JetStream cannot"
                " change that; move them to a new stream"
            )
        update = {k: v for k in _OURS if (v := getattr(want, k)) is not None and getattr(have, k) != v}
        if replicas and have.num_replicas != replicas:
            update["num_replicas"] = replicas
        if not update:
            return info
        return await js.update_stream(dataclasses.replace(have, **update))
    except nats.js.errors.ServiceUnavailableError:
        raise StreamError(_no_jetstream(want.name)) from None
    except nats.js.errors.APIError as exc:
        raise StreamError(f"stream {want.name}: {exc.description or exc}") from None
    except nats.errors.TimeoutError:
        raise StreamError(f"stream {want.name}: JetStream did not answer in {API_TIMEOUT_S:g} s") from None


class Stored(NamedTuple):
    """One message of a stream: its sequence number, when the server stored it, its subject and bytes."""

    seq: int
    time: float
    data: bytes
    subject: str = ""


async def read(
    nc: NATS, stream: str, since: float, *, what: str, creator: str, subject: str = "", start_seq: int = 0
) -> AsyncIterator[Stored]:
    """Every message stored at or after ``since`` (Unix seconds), or from sequence number
    ``start_seq`` where given, oldest first, up to those stored when reading began; only
    ``subject``'s (a filter) where given. An ephemeral pull consumer,
    deleted at the end, serves them in batches. ``what`` and ``creator`` word the error for a
    missing stream ("no usage stream X on this NATS server: `first up` ... creates it")."""
    js = nc.jetstream(timeout=API_TIMEOUT_S)
    by_seq = start_seq > 0
    consumer = api.ConsumerConfig(
        description=f"first {what}",
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if by_seq else api.DeliverPolicy.BY_START_TIME,
        opt_start_seq=start_seq if by_seq else None,
        opt_start_time=None if by_seq else datetime.datetime.fromtimestamp(since, datetime.UTC),
        ack_policy=api.AckPolicy.NONE,
        inactive_threshold=READER_INACTIVE_S,
        mem_storage=True,
        num_replicas=1,
        filter_subject=subject or None,
    )
    try:
        info = await js.add_consumer(stream, consumer)
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == _STREAM_NOT_FOUND:
            raise StreamNotFound(
                f"no {what} stream {stream} on this NATS server: {creator} creates it"
            ) from None
        raise StreamError(f"stream {stream}: {exc.description or exc}") from None
    except nats.js.errors.ServiceUnavailableError:
        raise StreamError(_no_jetstream(stream)) from None
    except nats.js.errors.APIError as exc:
        raise StreamError(f"stream {stream}: {exc.description or exc}") from None
    except nats.errors.TimeoutError:
        raise StreamError(f"stream {stream}: JetStream did not answer in {API_TIMEOUT_S:g} s") from None
    sub = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
    try:
        async for msg in _fetch_all(sub, info.num_pending or 0):
            meta = msg.metadata
            yield Stored(meta.sequence.stream, meta.timestamp.timestamp(), msg.data, msg.subject)
    finally:
        await sub.unsubscribe()
        try:
            await js.delete_consumer(stream, info.name)
        except (nats.errors.Error, TimeoutError):
            pass  # the server removes it after READER_INACTIVE_S anyway


async def _fetch_all(sub: JetStreamContext.PullSubscription, pending: int) -> AsyncIterator:
    stalls = 0
    while pending > 0:
        try:
            msgs = await sub.fetch(min(pending, READ_BATCH), timeout=API_TIMEOUT_S)
        except nats.errors.TimeoutError:
            # Messages counted at the start may have aged out since: ask what is left.
            pending = (await sub.consumer_info()).num_pending or 0
            stalls += 1
            if pending and stalls >= 3:
                raise StreamError(f"reading stalled with {pending} messages left") from None
            continue
        stalls = 0
        pending -= len(msgs)
        for msg in msgs:
            yield msg


def _no_jetstream(name: str) -> str:
    return f"stream {name}: JetStream is not enabled on this NATS server (run nats-server with -js)"
