"""``first events tail [--since 10m] [--kind node,worker] [--cluster X] [--json] [--no-follow]``:
the operator events (shared/events.py) from the event stream, then live as they come.

For people, one coloured line per event: time, kind.name, where (cluster, model, node or worker),
why, and the rest as key=value. For tools, ``--json``: one JSON object per line, the event as it
travels plus the stream's sequence number. Every failure is one line on stderr and status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

import msgspec
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import api

from services.admin import target
from services.admin.usage import Failed as BadSince
from services.admin.usage import parse_since
from shared import config as cfg
from shared import events, schema, streams
from shared.connect import ConnectFailed
from shared.subjects import Subjects

_COLOURS = {"node": "36", "worker": "32", "scale": "35", "request": "33", "limit": "31", "batch": "34"}
_BAD = {"failed", "lost", "hit"}


class Failed(Exception):
    """What went wrong, in one line for the operator."""


class Filter:
    def __init__(self, kinds: str, cluster: str):
        self.kinds = {k.strip() for k in kinds.split(",") if k.strip()}
        self.cluster = cluster

    def __call__(self, event: schema.Event) -> bool:
        return (not self.kinds or event.kind in self.kinds) and (
            not self.cluster or event.cluster == self.cluster
        )


def line(event: schema.Event, *, colour: bool) -> str:
    """One event for a person: ``14:02:11  node.running  polaris  llama-70b  polaris-n0  ...``."""
    when = time.strftime("%H:%M:%S", time.localtime(event.time))
    what = f"{event.kind}.{event.name}"
    if colour:
        code = "1;31" if event.name in _BAD else _COLOURS.get(event.kind, "0")
        what = f"\x1b[{code}m{what:<18}\x1b[0m"
    else:
        what = f"{what:<18}"
    where = " ".join(
        x for x in (event.cluster, event.model, event.node_id or event.worker_id, event.request_id) if x
    )
    rest = " ".join(f"{k}={_short(v)}" for k, v in event.data.items())
    parts = [when, what, where, event.reason and f"({event.reason})", rest, f"[{event.source}]"]
    return "  ".join(p for p in parts if p)


def _short(value: object) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= 80 else text[:79] + "…"


class Printer:
    def __init__(self, args: argparse.Namespace, keep: Filter):
        self.json, self.keep = args.json, keep
        self.colour = not args.json and sys.stdout.isatty() and not args.no_color
        self.last_seq = 0  # the newest stream message seen (shown or not)

    def show(self, seq: int, data: bytes) -> None:
        if seq <= self.last_seq:
            return  # history and the live tail overlap by a message or two
        self.last_seq = seq
        try:
            event = events.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return  # not an event: nothing an operator can read
        if not self.keep(event):
            return
        if self.json:
            out = orjson.dumps({**msgspec.to_builtins(event), "seq": seq}).decode()
        else:
            out = line(event, colour=self.colour)
        sys.stdout.write(out + "\n")
        sys.stdout.flush()


async def _follow(nc: NATS, config: cfg.Config, printer: Printer, start_seq: int) -> None:
    """Every event from ``start_seq`` on, as it is stored, until cancelled (an ordered consumer:
    nats-py recreates it after a gap or a reconnect)."""
    js = nc.jetstream(timeout=streams.API_TIMEOUT_S)
    queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)

    async def arrived(msg) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait((msg.metadata.sequence.stream, msg.data))

    consumer = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
    sub = await js.subscribe(
        Subjects(config.nats.subject_prefix).events_all, stream=events.stream_name(config), cb=arrived,
        ordered_consumer=True, config=consumer, inactive_threshold=streams.READER_INACTIVE_S,
    )  # fmt: skip
    try:
        while True:
            printer.show(*(await queue.get()))
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def _tail(nc: NATS, config: cfg.Config, args: argparse.Namespace, since: float) -> None:
    printer = Printer(args, Filter(args.kind, args.cluster))
    name = events.stream_name(config)
    try:
        info = await nc.jetstream(timeout=streams.API_TIMEOUT_S).stream_info(name)
        async for stored in events.history(nc, config, since):
            printer.show(stored.seq, stored.data)
        if args.no_follow:
            return
        await _follow(nc, config, printer, max(printer.last_seq, info.state.last_seq) + 1)
    except nats.js.errors.NotFoundError:
        raise Failed(f"no event stream {name} on this NATS server: {events.CREATOR} creates it") from None
    except streams.StreamError as exc:
        raise Failed(str(exc)) from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise Failed(f"NATS: {str(exc) or type(exc).__name__}") from None


async def main(config: cfg.Config, args: argparse.Namespace) -> int:
    try:
        since = parse_since(args.since, time.time())
    except BadSince as exc:
        print(f"first events: {exc}", file=sys.stderr)
        return 2
    try:
        nc, _url = await target.connect(config, args, "first-events")
    except ConnectFailed as exc:
        print(f"first events: {exc}", file=sys.stderr)
        return 2
    try:
        await _tail(nc, config, args, since)
    except Failed as exc:
        sys.stdout.flush()
        print(f"first events: {exc}", file=sys.stderr)
        return 2
    finally:
        with contextlib.suppress(nats.errors.Error):
            await nc.close()
    return 0
