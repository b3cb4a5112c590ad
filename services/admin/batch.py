"""``first batch submit FILE --model M``, ``first batch status [ID] [--watch]``, ``first batch
results ID -o out.jsonl``: batch mode from an operator's terminal, straight on NATS (the admin
seed of ``first up``, as ``first keys``), through the same buckets the gateway uses
(shared/batchstore.py). A batch submitted here belongs to ``--user`` (default: anonymous, the
identity of callers where auth is off).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats.errors
import orjson

from services.admin import target
from shared import batchstore, schema
from shared import config as cfg
from shared.batchstore import Batches, Files
from shared.connect import ConnectFailed
from shared.openai_protocol import BATCH_ENDPOINTS
from shared.subjects import Subjects

_READ_BYTES = 256 * 1024
_BAR = 30


async def main(config: cfg.Config, args: argparse.Namespace) -> int:
    return await target.one_line(f"first batch {args.action}", _main(config, args))


async def _main(config: cfg.Config, args: argparse.Namespace) -> int:
    try:
        nc, _ = await target.connect(config, args, "first-batch-admin")
    except ConnectFailed as exc:
        raise target.CommandError(str(exc)) from None
    try:
        files, batches = await Files.open(nc, config), await Batches.open(nc, config)
        match args.action:
            case "submit":
                record = await _submit(nc, config, files, batches, args)
                print(record.id)
                if args.wait:
                    return await _follow(batches, record.owner, record.id, watch=True, as_json=False)
                return 0
            case "status":
                if not args.id:
                    return _list(await batches.of(), args.json)
                return await _follow(batches, None, args.id, watch=args.watch, as_json=args.json)
            case "results":
                return await _results(files, batches, args)
    except batchstore.StoreError as exc:
        raise target.CommandError(str(exc)) from None
    finally:
        with contextlib.suppress(nats.errors.Error):
            await nc.close()
    return 2


async def _submit(nc, config: cfg.Config, files: Files, batches: Batches, args) -> schema.BatchRecord:
    path = Path(args.file)
    if not await asyncio.to_thread(path.is_file):
        raise target.CommandError(f"no such file: {path}")
    if args.endpoint not in BATCH_ENDPOINTS:
        raise target.CommandError(f"--endpoint must be one of {', '.join(BATCH_ENDPOINTS)}")
    limit = config.batch.max_file_megabytes << 20
    if (await asyncio.to_thread(path.stat)).st_size > limit:
        raise target.CommandError(f"{path} is larger than batch.max_file_megabytes ({limit >> 20} MB)")

    async def chunks() -> AsyncIterator[bytes]:
        f = await asyncio.to_thread(path.open, "rb")
        try:
            while data := await asyncio.to_thread(f.read, _READ_BYTES):
                yield data
        finally:
            f.close()

    created = batchstore.now()
    upload = schema.FileRecord(
        id=batchstore.new_file_id(),
        owner=args.user,
        filename=path.name[:255],
        purpose="batch",
        created_at=created,
    )
    await files.put(upload, chunks())
    record = schema.BatchRecord(
        id=batchstore.new_batch_id(),
        owner=args.user,
        input_file_id=upload.id,
        endpoint=args.endpoint,
        completion_window="24h",
        created_at=created,
        expires_at=created + 24 * 3600,
        model=args.model,
    )
    await batches.create(record)
    key = batchstore.batch_key(record.owner, record.id)
    changed = Subjects(config.nats.subject_prefix).batch_changed
    with contextlib.suppress(nats.errors.Error):
        await nc.publish(changed, schema.encode(schema.BatchChanged(key)))
    return record


async def _find(batches: Batches, owner: str | None, batch_id: str) -> tuple[str, schema.BatchRecord]:
    if owner is not None:
        key = batchstore.batch_key(owner, batch_id)
        if (record := await batches.get(key)) is not None:
            return key, record
    for key in await batches.keys():
        if key.endswith("." + batch_id) and (record := await batches.get(key)) is not None:
            return key, record
    raise target.CommandError(f"no batch {batch_id}")


def progress_line(r: schema.BatchRecord, rate: float | None) -> str:
    """``batch_x  in_progress  [######----]  60%  600/1000 (3 failed)  120 lines/s  ETA 3s``."""
    done = r.completed + r.failed
    share = done / r.total if r.total else 0.0
    bar = "#" * round(share * _BAR) + "-" * (_BAR - round(share * _BAR))
    text = f"{r.id}  {r.status:<11} [{bar}] {share * 100:3.0f}%  {done}/{r.total}"
    if r.failed:
        text += f" ({r.failed} failed)"
    if rate:
        text += f"  {rate:,.0f} lines/s"
        if r.status == "in_progress" and r.total > done:
            text += f"  ETA {(r.total - done) / rate:,.0f}s"
    return text


async def _follow(batches: Batches, owner: str | None, batch_id: str, *, watch: bool, as_json: bool) -> int:
    key, record = await _find(batches, owner, batch_id)
    last: tuple[float, int] | None = None
    tty = sys.stdout.isatty()
    while True:
        now, done = time.monotonic(), record.completed + record.failed
        rate = (done - last[1]) / (now - last[0]) if last and now > last[0] else None
        if rate is None and record.in_progress_at and done:  # since it began, at first
            rate = done / max(1.0, time.time() - record.in_progress_at)
        last = (now, done) if last is None or now - last[0] >= 2.0 else last
        if as_json:
            print(orjson.dumps(msgspec.to_builtins(record)).decode())
        else:
            print(
                ("\r" if tty and watch else "") + progress_line(record, rate),
                end="" if tty and watch else "\n",
            )
            if record.status in batchstore.FINAL:
                if tty and watch:
                    print()
                _summary(record)
        sys.stdout.flush()
        if not watch or record.status in batchstore.FINAL:
            return 0 if record.status != "failed" else 1
        await asyncio.sleep(1.0)
        record = await batches.get(key) or record


def _summary(r: schema.BatchRecord) -> None:
    if r.output_file_id:
        print(f"  output file {r.output_file_id}   (first batch results {r.id} -o out.jsonl)")
    if r.error_file_id:
        print(f"  error file  {r.error_file_id}   (first batch results {r.id} --errors -o errors.jsonl)")
    for e in r.errors:
        print(f"  error: {e.code}: {e.message}")


def _list(records: list[schema.BatchRecord], as_json: bool) -> int:
    if as_json:
        print(orjson.dumps([msgspec.to_builtins(r) for r in records]).decode())
        return 0
    if not records:
        print("no batches")
        return 0
    print(f"{'ID':<38} {'OWNER':<16} {'STATUS':<11} {'DONE':>15} {'FAILED':>7}  CREATED")
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.created_at))
        done = f"{r.completed + r.failed}/{r.total}"
        print(f"{r.id:<38} {r.owner[:16]:<16} {r.status:<11} {done:>15} {r.failed:>7}  {created}")
    return 0


async def _results(files: Files, batches: Batches, args) -> int:
    _, record = await _find(batches, None, args.id)
    file_id = record.error_file_id if args.errors else record.output_file_id
    if record.status not in batchstore.FINAL:
        raise target.CommandError(f"batch {record.id} is {record.status}: its files come when it ends")
    if not file_id:
        raise target.CommandError(f"batch {record.id} has no {'error' if args.errors else 'output'} file")
    _, info = await files.info(file_id)
    out = sys.stdout.buffer if args.output == "-" else await asyncio.to_thread(Path(args.output).open, "wb")
    try:
        async for data in files.chunks(info):
            await asyncio.to_thread(out.write, data)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
        else:
            out.flush()
    if args.output != "-":
        print(f"wrote {info.size} bytes to {args.output}", file=sys.stderr)
    return 0
