"""FIRST's batch route, a thin layer over the OpenAI Batches machinery (services/gateway/batches.py).

``POST /resource_server/<cluster>/<framework>/v1/batches`` takes FIRST's body (``input_file``,
``model``, ``output_folder_path``) and runs every line of the file on that model, pinned to that
cluster. ``input_file`` is the id of a file uploaded with ``POST /v1/files`` (there is no shared
filesystem between a caller and this service); ``output_folder_path`` is kept and shown, the
results come from ``/v1/files/<output_file_id>/content``. The listing and the status are JSON
objects with OpenAI's statuses, not FIRST's bare strings and Python reprs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import msgspec
from aiohttp import web

from services.gateway import batches, first_routes, handlers, keys
from services.gateway.body import read_json_body
from services.gateway.files import batches_of
from services.gateway.middleware import json_response
from shared import errors, schema
from shared.openai_protocol import decode_request

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class FirstBatchSubmit(msgspec.Struct, forbid_unknown_fields=True):
    input_file: NonEmpty
    model: NonEmpty
    output_folder_path: str | None = None


def _iso(stamp: int | None) -> str | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, UTC).isoformat()


def _summary(r: schema.BatchRecord) -> dict:
    return {
        "id": r.id,
        "batch_id": r.id,
        "cluster": r.cluster,
        "framework": r.framework,
        "model": r.model,
        "input_file": r.input_file_id,
        "in_progress_at": _iso(r.in_progress_at),
        "completed_at": _iso(r.completed_at),
        "failed_at": _iso(r.failed_at),
        "status": r.status,
        "request_counts": {"total": r.total, "completed": r.completed, "failed": r.failed},
        "output_file_id": r.output_file_id or None,
        "error_file_id": r.error_file_id or None,
    }


async def submit(request: web.Request) -> web.Response:
    cluster = first_routes._pinned(request)  # FIRST's checks: cluster, maintenance, framework
    await read_json_body(request)
    req = decode_request(await request.read(), FirstBatchSubmit)
    model = handlers.admit(request, req.model, cluster)  # served there, by that framework, for this caller
    record = await batches.create(
        request,
        batches.BatchRequest(input_file_id=req.input_file, endpoint="/v1/chat/completions"),
        model=model,
        cluster=cluster,
        framework=request.match_info["framework"],
    )
    return json_response(
        {
            "batch_id": record.id,
            "input_file": record.input_file_id,
            "output_folder_path": req.output_folder_path,
            "status": record.status,
        }
    )


async def listing(request: web.Request) -> web.Response:
    records = await batches_of(request).of(request[keys.IDENTITY].user)
    if wanted := request.query.get("status"):
        records = [r for r in records if r.status == wanted]
    return json_response({"object": "list", "data": [_summary(r) for r in records]})


async def status(request: web.Request) -> web.Response:
    _, record = await batches.mine(request, request.match_info["batch_id"])
    return json_response(_summary(record))


async def result(request: web.Request) -> web.Response:
    _, record = await batches.mine(request, request.match_info["batch_id"])
    if record.status == "failed":
        err = errors.BadRequest(
            f"Batch failed: {'; '.join(e.message for e in record.errors) or 'see its error file'}"
        )
        err.code = "batch_failed"
        raise err
    if record.status not in ("completed", "cancelled", "expired"):
        err = errors.BadRequest("Batch not completed yet. Results not ready.")
        err.code = "batch_ongoing"
        raise err
    return json_response(_summary(record))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/resource_server/{cluster}/{framework}/v1/batches", submit)
    app.router.add_get("/resource_server/v1/batches", listing)
    app.router.add_get("/resource_server/v1/batches/{batch_id}", status)
    app.router.add_get("/resource_server/v1/batches/{batch_id}/result", result)
