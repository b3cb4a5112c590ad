"""A batch's output file (the answers) and error file (the lines that failed), written from its
results as they are read: neither is ever whole in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.batch.queues import Queues
from shared import batchstore, schema
from shared.batchstore import Files

_WRITE_BYTES = 256 * 1024


async def write_outputs(
    files: Files, queues: Queues, record: schema.BatchRecord, *, with_output: bool = True
) -> tuple[str, str]:
    """``(output file id, error file id)``; "" where the batch has no such lines."""
    output = await _write(files, queues, record, ok=True) if with_output else ""
    errors = await _write(files, queues, record, ok=False)
    return output, errors


async def _write(files: Files, queues: Queues, record: schema.BatchRecord, *, ok: bool) -> str:
    found = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal found
        buf = bytearray()
        async for result in queues.read(record.id):
            if result.ok is ok:
                found += 1
                buf += result.output
                buf += b"\n"
                if len(buf) >= _WRITE_BYTES:
                    yield bytes(buf)
                    buf.clear()
        if buf:
            yield bytes(buf)

    created = batchstore.now()
    file = schema.FileRecord(
        id=batchstore.new_file_id(),
        owner=record.owner,
        filename=f"{record.id}_{'output' if ok else 'error'}.jsonl",
        purpose="batch_output",
        created_at=created,
    )
    await files.put(file, chunks())
    if not found:
        await files.delete(file.id)
        return ""
    return file.id
