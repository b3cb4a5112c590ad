"""OpenAI's Batches API (and FIRST's batch route over the same machinery).

The gateway writes a new batch's record to the batches KV bucket and nudges the batch service
(services/batch), which does the rest; a cancel moves the record to ``cancelling`` the same way.
Reads come straight from the bucket. A caller sees only their own batches: the key holds the
owner (shared/batchstore.py), so another user's batch id is simply not found (404).
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
import nats.errors
import nats.js.errors
from aiohttp import web

from services.gateway import keys
from services.gateway.body import read_json_body
from services.gateway.files import batches_of, owned
from services.gateway.middleware import json_response
from shared import batchstore, errors, schema
from shared.openai_protocol import BATCH_ENDPOINTS, decode_request
from shared.subjects import Subjects

_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class BatchRequest(msgspec.Struct, kw_only=True):
    input_file_id: Annotated[str, msgspec.Meta(max_length=128)]
    endpoint: str
    completion_window: str = "24h"
    metadata: (
        Annotated[dict[str, Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=16)] | None
    ) = None


def batch_json(r: schema.BatchRecord) -> dict:
    return {
        "id": r.id,
        "object": "batch",
        "endpoint": r.endpoint,
        "errors": {"object": "list", "data": [msgspec.to_builtins(e) for e in r.errors]}
        if r.errors
        else None,
        "input_file_id": r.input_file_id,
        "completion_window": r.completion_window,
        "status": r.status,
        "output_file_id": r.output_file_id or None,
        "error_file_id": r.error_file_id or None,
        "created_at": r.created_at,
        "in_progress_at": r.in_progress_at,
        "expires_at": r.expires_at,
        "finalizing_at": r.finalizing_at,
        "completed_at": r.completed_at,
        "failed_at": r.failed_at,
        "expired_at": r.expired_at,
        "cancelling_at": r.cancelling_at,
        "cancelled_at": r.cancelled_at,
        "request_counts": {"total": r.total, "completed": r.completed, "failed": r.failed},
        "metadata": r.metadata,
    }


async def _nudge(request: web.Request, key: str) -> None:
    subjects = Subjects(request.app[keys.CONFIG].nats.subject_prefix)
    try:
        await request.app[keys.NC].publish(subjects.batch_changed, schema.encode(schema.BatchChanged(key)))
    except nats.errors.Error:
        pass  # the batch service rescans the bucket every few seconds


async def create(
    request: web.Request,
    req: BatchRequest | None = None,
    *,
    model: str = "",
    cluster: str = "",
    framework: str = "",
) -> schema.BatchRecord:
    """A new batch of the caller's; ``model``, ``cluster``: FIRST's route pins both."""
    identity = request[keys.IDENTITY]
    config = request.app[keys.CONFIG]
    if req.endpoint not in BATCH_ENDPOINTS:
        raise errors.BadRequest(
            f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}, not {req.endpoint[:64]!r}.",
            param="endpoint",
        )
    window = batchstore.parse_window(req.completion_window)
    if window is None:
        raise errors.BadRequest("completion_window must be like '24h'.", param="completion_window")
    upload, _ = await owned(request, req.input_file_id)
    if upload.purpose != "batch":
        raise errors.BadRequest(
            f"File {upload.id} was not uploaded with purpose 'batch'.", param="input_file_id"
        )
    batches = batches_of(request)
    active = [r for r in await batches.of(identity.user) if r.status in batchstore.ACTIVE]
    if len(active) >= config.batch.max_active_batches:
        raise errors.RateLimited(
            f"You have {len(active)} batches in progress, the most this service runs for one user;"
            " wait for one to end or cancel one.",
            retry_after_s=60.0,
        )
    created = batchstore.now()
    record = schema.BatchRecord(
        id=batchstore.new_batch_id(),
        owner=identity.user,
        input_file_id=upload.id,
        endpoint=req.endpoint,
        completion_window=req.completion_window,
        created_at=created,
        expires_at=created + window,
        identity=None if identity.kind == "anonymous" else identity,
        metadata=req.metadata,
        model=model,
        cluster=cluster,
        framework=framework,
    )
    await batches.create(record)
    await _nudge(request, batchstore.batch_key(record.owner, record.id))
    return record


async def create_batch(request: web.Request) -> web.Response:
    await read_json_body(request)
    req = decode_request(await request.read(), BatchRequest)
    return json_response(batch_json(await create(request, req)))


async def mine(request: web.Request, batch_id: str) -> tuple[str, schema.BatchRecord]:
    if not _BATCH_ID.fullmatch(batch_id):
        raise errors.NotFound(f"No such Batch object: {batch_id[:128]}", param="batch_id")
    key = batchstore.batch_key(request[keys.IDENTITY].user, batch_id)
    record = await batches_of(request).get(key)
    if record is None:
        raise errors.NotFound(f"No such Batch object: {batch_id}", param="batch_id")
    return key, record


async def get_batch(request: web.Request) -> web.Response:
    _, record = await mine(request, request.match_info["batch_id"])
    return json_response(batch_json(record))


async def cancel_batch(request: web.Request) -> web.Response:
    key, record = await mine(request, request.match_info["batch_id"])

    def cancelling(r: schema.BatchRecord) -> schema.BatchRecord | None:
        if r.status not in ("validating", "in_progress"):
            return None
        return msgspec.structs.replace(r, status="cancelling", cancelling_at=batchstore.now())

    try:
        record = await batches_of(request).update(key, cancelling) or record
    except nats.js.errors.Error as exc:
        raise errors.NoCapacity(
            f"The batch could not be cancelled now ({exc!r}); retry.", retry_after_s=2.0
        ) from None
    if record.status in ("completed", "failed", "expired"):
        err = errors.Conflict(f"Cannot cancel a batch with status '{record.status}'.")
        err.code = "batch_not_cancellable"
        raise err
    await _nudge(request, key)
    return json_response(batch_json(record))


async def list_batches(request: web.Request) -> web.Response:
    records = await batches_of(request).of(request[keys.IDENTITY].user)
    if after := request.query.get("after"):
        ids = [r.id for r in records]
        records = records[ids.index(after) + 1 :] if after in ids else []
    raw = request.query.get("limit", "20")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 16) or not 1 <= int(raw) <= 100:
        raise errors.BadRequest("limit must be a whole number from 1 to 100.", param="limit")
    page = records[: int(raw)]
    return json_response(
        {
            "object": "list",
            "data": [batch_json(r) for r in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(records) > len(page),
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    from services.gateway import first_batches  # it builds on this module

    first_batches.add_routes(app)  # FIRST's batch route over the same machinery
