"""OpenAI's Files API for batch mode: upload a JSONL file, list, look up, download, delete.

Uploads stream into the JetStream Object Store as they arrive (shared/batchstore.py): the
gateway holds one line at most, whatever the size. Each line is checked to be a JSON object
on the way (a file that is not JSONL is refused with the line that is not); what a request line
must hold is checked when a batch is created from it. A file belongs to who uploaded it: to
anyone else it does not exist (404).
"""

from __future__ import annotations

import asyncio

import msgspec
import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from services.gateway import keys
from services.gateway.clip import clip
from services.gateway.middleware import json_response
from shared import batchstore, errors, schema
from shared.batchstore import Batches, Files
from shared.children import cancel_and_wait
from shared.supervise import Throttle

MAX_LINE_BYTES = 1 << 20  # a request line must fit in one NATS message
_RETRY_S = 5.0
_object = msgspec.json.Decoder(dict[str, msgspec.Raw])


class Stores:
    """The files bucket and the batches bucket, once open. A gateway whose NATS has no JetStream
    (yet) still serves everything else; the Files and Batches routes answer 503 until it does."""

    def __init__(self) -> None:
        self.files: Files | None = None
        self.batches: Batches | None = None
        self.why = "batch mode is starting"

    async def open(self, nc, config) -> None:
        noise = Throttle()
        while True:
            try:
                self.files = self.files or await Files.open(nc, config)
                self.batches = await Batches.open(nc, config)
                return
            except batchstore.StoreError as exc:
                self.why = f"batch mode is not available: {exc}"
                if noise("open"):
                    structlog.get_logger().warning(
                        "batch_store_unavailable", error=str(exc), retry_s=_RETRY_S
                    )
            await asyncio.sleep(_RETRY_S)


STORES = web.AppKey("batch_stores", Stores)


def files_of(request: web.Request) -> Files:
    stores = request.app[STORES]
    if stores.files is None:
        raise errors.ServiceUnavailable(f"{stores.why}; try again shortly.", retry_after_s=_RETRY_S)
    return stores.files


def batches_of(request: web.Request) -> Batches:
    stores = request.app[STORES]
    if stores.batches is None:
        raise errors.ServiceUnavailable(f"{stores.why}; try again shortly.", retry_after_s=_RETRY_S)
    return stores.batches


async def batch_ctx(app: web.Application):
    """Open the buckets (creating them if new) once the NATS connection is up, in the background
    and again until they open: the gateway starts either way."""
    app[STORES] = stores = Stores()
    task = asyncio.create_task(stores.open(app[keys.NC], app[keys.CONFIG]), name="batch-stores")
    yield
    await cancel_and_wait(task)


def file_json(f: schema.FileRecord) -> dict:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "expires_at": f.expires_at or None,
        "status_details": None,
    }


class _JsonlCheck:
    """Sees the upload's bytes as they come: every non-blank line must be a JSON object."""

    def __init__(self, limit: int):
        self.limit, self.size, self.line, self.rest = limit, 0, 0, b""

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise errors.PayloadTooLarge(
                f"The file is larger than this service accepts ({self.limit // (1 << 20)} MB).", param="file"
            )
        data = self.rest + data
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._one(data[start:end])
            start = end + 1
        self.rest = data[start:]
        if len(self.rest) > MAX_LINE_BYTES:
            raise errors.BadRequest(
                f"Line {self.line + 1} is longer than {MAX_LINE_BYTES} bytes.", param="file"
            )

    def end(self) -> None:
        if self.rest:
            self._one(self.rest)
        if self.line == 0 or self.size == 0:
            raise errors.BadRequest(
                "The file is empty; a batch file holds one JSON request per line.", param="file"
            )

    def _one(self, line: bytes) -> None:
        self.line += 1
        if not line.strip():
            return
        try:
            _object.decode(line)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            raise errors.BadRequest(
                f"The file is not JSONL: line {self.line} is not a JSON object.", param="file"
            ) from None


async def create_file(request: web.Request) -> web.Response:
    identity = request[keys.IDENTITY]
    config = request.app[keys.CONFIG]
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise errors.BadRequest(
            "Send the file as multipart/form-data, with fields `file` and `purpose`."
        ) from None
    purpose, stored = None, None
    files = files_of(request)
    try:
        async for part in reader:
            if part.name == "purpose":
                purpose = (await part.text()).strip()
                if purpose != "batch":
                    raise errors.BadRequest(
                        f"purpose must be 'batch', not {purpose[:64]!r}.", param="purpose"
                    )
            elif part.name == "file" and stored is None:
                check = _JsonlCheck(config.batch.max_file_megabytes << 20)
                record = schema.FileRecord(
                    id=batchstore.new_file_id(),
                    owner=identity.user,
                    filename=(part.filename or "upload.jsonl")[:255],
                    purpose="batch",
                    created_at=batchstore.now(),
                )

                async def chunks(part=part, check=check):
                    while data := await part.read_chunk(256 * 1024):
                        yield data
                    check.end()

                stored = await files.put(record, chunks(), check)
            else:
                await part.release()
    except web.HTTPException:
        raise
    except errors.FirstError:
        if stored is not None:
            await files.delete(stored.id)
        raise
    except (ValueError, BadHttpMessage) as exc:  # a malformed body, or part headers (control bytes)
        if stored is not None:
            await files.delete(stored.id)
        detail = exc.message if isinstance(exc, BadHttpMessage) else str(exc)
        raise errors.BadRequest(f"The multipart body could not be read: {clip(detail)}") from None
    if stored is None:
        raise errors.BadRequest("No `file` field in the upload.", param="file")
    if purpose is None:
        await files.delete(stored.id)
        raise errors.BadRequest("No `purpose` field in the upload; use 'batch'.", param="purpose")
    return json_response(file_json(stored))


async def owned(request: web.Request, file_id: str):
    """The caller's file of this id, with its object info; 404 for anyone else's."""
    try:
        record, info = await files_of(request).info(file_id)
    except batchstore.FileNotFound:
        raise errors.NotFound(f"No such File object: {file_id}", param="file_id") from None
    if record.owner != request[keys.IDENTITY].user:
        raise errors.NotFound(f"No such File object: {file_id}", param="file_id")
    return record, info


async def list_files(request: web.Request) -> web.Response:
    user = request[keys.IDENTITY].user
    purpose = request.query.get("purpose")
    mine = [
        f
        for f in await files_of(request).list()
        if f.owner == user and (purpose is None or f.purpose == purpose)
    ]
    mine.sort(key=lambda f: (f.created_at, f.id), reverse=request.query.get("order", "desc") == "desc")
    if after := request.query.get("after"):
        ids = [f.id for f in mine]
        mine = mine[ids.index(after) + 1 :] if after in ids else []
    limit = _limit(request, 10_000)
    page = mine[:limit]
    return json_response(
        {
            "object": "list",
            "data": [file_json(f) for f in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(mine) > limit,
        }
    )


def _limit(request: web.Request, default: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 16) or not 1 <= int(raw) <= 10_000:
        raise errors.BadRequest("limit must be a whole number from 1 to 10000.", param="limit")
    return int(raw)


async def get_file(request: web.Request) -> web.Response:
    record, _ = await owned(request, request.match_info["file_id"])
    return json_response(file_json(record))


async def file_content(request: web.Request) -> web.StreamResponse:
    record, info = await owned(request, request.match_info["file_id"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = record.bytes
    await response.prepare(request)
    async for data in files_of(request).chunks(info):
        await response.write(data)
    await response.write_eof()
    return response


async def delete_file(request: web.Request) -> web.Response:
    record, _ = await owned(request, request.match_info["file_id"])
    await files_of(request).delete(record.id)
    return json_response({"id": record.id, "object": "file", "deleted": True})


def add_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(batch_ctx)
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
