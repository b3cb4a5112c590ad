"""Operator events: JSON on ``<p>.v1.events.<kind>.<name>.<source>``, kept in a JetStream stream.

Services publish on core NATS (an event never holds up the work it reports; one lost while NATS
is down is lost, as a log line would be) and the stream captures the subjects, so ``first events
tail --since 10m`` and ``nats stream view`` can look back. ``first up`` and every ``first router``
create the stream, or bring its limits in line with the config (``[events]``).

An event that can repeat without bound (a user hitting a limit a thousand times a second) goes
through ``emit_at_most``: one per key and period, the next one counting those left out. Metrics
count every occurrence; events are for reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import api

from shared import config as cfg
from shared import schema, streams
from shared.subjects import Subjects
from shared.supervise import Throttle

MSG_ID = api.Header.MSG_ID.value
# Several publishers may report one fact (two routers seeing a worker go): a shared Nats-Msg-Id
# stores it once within this window.
DUPLICATE_WINDOW_S = 120.0
DAY_S = 86_400.0
CREATOR = "`first up` or a `first router`"

_encoder = msgspec.json.Encoder()


def encode(event: schema.Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> schema.Event:
    """An event from the wire (untrusted): msgspec's errors for anything else."""
    return schema.event_decoder.decode(data)


def stream_name(config: cfg.Config) -> str:
    """``events.stream``, else from the prefix: ``first`` -> ``FIRST_EVENTS``."""
    return config.events.stream or config.nats.subject_prefix.replace(".", "_").upper() + "_EVENTS"


def stream_config(config: cfg.Config) -> api.StreamConfig:
    max_age = config.events.retention_days * DAY_S
    return api.StreamConfig(
        name=stream_name(config),
        description="FIRST operator events (first events tail)",
        subjects=[Subjects(config.nats.subject_prefix).events_all],
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        storage=api.StorageType.FILE,
        max_age=max_age,
        max_bytes=config.events.max_megabytes * 1_000_000,
        duplicate_window=min(DUPLICATE_WINDOW_S, max_age),
        num_replicas=config.events.replicas or 1,
    )


async def ensure(nc: NATS, config: cfg.Config) -> api.StreamInfo:
    return await streams.ensure(
        nc, stream_config(config), name_setting="events.stream", replicas=config.events.replicas
    )


def history(nc: NATS, config: cfg.Config, since: float) -> AsyncIterator[streams.Stored]:
    """Every event stored since ``since`` (unix seconds), oldest first, up to the newest now."""
    return streams.read(nc, stream_name(config), since, what="events", creator=CREATOR)


async def newest(nc: NATS, config: cfg.Config, count: int) -> list[schema.Event]:
    """The stream's last ``count`` events (fewer if it holds fewer), oldest first; unreadable
    messages left out."""
    info = await nc.jetstream(timeout=streams.API_TIMEOUT_S).stream_info(stream_name(config))
    if not info.state.messages:
        return []
    start = max(info.state.first_seq, info.state.last_seq - count + 1)
    out = []
    async for stored in streams.read(
        nc, info.config.name, 0.0, what="events", creator=CREATOR, start_seq=start
    ):
        with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
            out.append(decode(stored.data))
    return out[-count:]


class EventPublisher:
    """One service's events, all from ``source`` (a subject token: "scaler", a router's id)."""

    def __init__(self, nc: NATS, subjects: Subjects, source: str, clock: Callable[[], float] = time.time):
        self.nc, self.subjects, self.clock = nc, subjects, clock
        self.source = source
        subjects.event("config", "loaded", source)  # a bad source fails here, not at the first event
        self._noise = Throttle()
        self._gates: dict[float, Throttle] = {}  # one per period
        self._left_out: dict[str, int] = {}
        self._posted: set[asyncio.Task] = set()

    async def emit(
        self,
        kind: str,
        name: str,
        *,
        cluster: str = "",
        model: str = "",
        node_id: str = "",
        worker_id: str = "",
        request_id: str = "",
        user: str = "",
        reason: str = "",
        msg_id: str = "",
        **data: object,
    ) -> None:
        """Publish one event; never raises (a lost event is logged, once a minute at most)."""
        try:
            event = schema.Event(
                kind=kind, name=name, time=self.clock(), source=self.source, cluster=cluster,
                model=model, node_id=node_id, worker_id=worker_id, request_id=request_id,
                user=user, reason=reason[:4096], data=data,
            )  # fmt: skip
            headers = {MSG_ID: msg_id} if msg_id else None
            await self.nc.publish(
                self.subjects.event(kind, name, self.source), encode(event), headers=headers
            )
        except (nats.errors.Error, ValueError, TypeError, msgspec.EncodeError) as exc:
            if self._noise(f"{kind}.{name}"):
                structlog.get_logger().warning(
                    "event_not_sent", kind=kind, name=name, error=repr(exc), note="once a minute"
                )

    async def emit_at_most(self, period_s: float, key: str, kind: str, name: str, **fields) -> None:
        """``emit``, at most once per ``key`` and ``period_s``; the one that goes says how many of
        its kind were left out since (``data.left_out``)."""
        gate = self._gates.setdefault(period_s, Throttle(period_s))
        if not gate(key):
            if len(self._left_out) < 10_000:
                self._left_out[key] = self._left_out.get(key, 0) + 1
            return
        if left_out := self._left_out.pop(key, 0):
            fields["left_out"] = left_out
        await self.emit(kind, name, **fields)

    def post(self, period_s: float, key: str, kind: str, name: str, **fields) -> None:
        """``emit_at_most`` from code that cannot wait (a check on the request path): sent by a task
        of its own, which never fails."""
        if len(self._posted) >= 1_000:  # NATS stuck: events are the first thing to give up
            return
        task = asyncio.get_running_loop().create_task(self.emit_at_most(period_s, key, kind, name, **fields))
        self._posted.add(task)
        task.add_done_callback(self._posted.discard)
