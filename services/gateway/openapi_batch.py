"""The Files and Batches part of the OpenAPI document (openapi.py): their answers' shapes, for the
document only, mirroring what files.py and batches.py build, and the operations with the errors
each handler can answer.

The batch create body is described by the Struct that decodes it (batches.BatchRequest), with
what the handler checks beyond it (the endpoint, the window's form) added to its schema.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from services.gateway.batches import BatchRequest
from shared.openai_protocol import BATCH_ENDPOINTS

# --- response shapes, for the document only ----------------------------------------------------


class FileObject(msgspec.Struct):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"]
    expires_at: int | None
    status_details: None


class FileList(msgspec.Struct):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(msgspec.Struct):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchErrorItem(msgspec.Struct):
    """Why a batch failed as a whole; ``line`` and ``param`` only where they apply."""

    code: str
    message: str
    line: int | msgspec.UnsetType = msgspec.UNSET
    param: str | msgspec.UnsetType = msgspec.UNSET


class BatchErrors(msgspec.Struct):
    object: Literal["list"]
    data: list[BatchErrorItem]


class BatchRequestCounts(msgspec.Struct):
    total: int
    completed: int
    failed: int


class Batch(msgspec.Struct):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None


class BatchList(msgspec.Struct):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


SCHEMAS = (BatchRequest, FileObject, FileList, FileDeleted, Batch, BatchList)


def refine(schemas: dict) -> None:
    """What create_batch refuses beyond BatchRequest's own checks, in its schema."""
    props = schemas["BatchRequest"]["properties"]
    props["endpoint"]["enum"] = list(BATCH_ENDPOINTS)
    props["completion_window"]["pattern"] = "^[0-9]{1,3}h$"
    props["completion_window"]["description"] = "Hours, from `1h` to `720h`; OpenAI's is `24h`."


# --- the operations ------------------------------------------------------------------------------

_AUTH = {
    401: "No credential, or one this service does not accept (where `auth.methods` is not `none`).",
    403: "The credential is valid but its identity may not use this service.",
}
_EDGE = {
    400: "The HTTP request itself is malformed.",
    431: "The request line or a header field is over 8190 bytes, or there are over 128 header fields.",
    500: "A bug; it is logged with the request id.",
    503: "Batch mode is not available yet (JetStream), or the gateway has too many open connections. "
    "Comes with `Retry-After`.",
}
_RETRY = ("429", "503")


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _operation(summary: str, ok: dict, errors: dict[int, str], **more) -> dict:
    """An operation whose errors, each described here, all carry OpenAI's envelope."""
    responses: dict = {"200": ok}
    for status, text in sorted((_AUTH | _EDGE | errors).items()):
        responses[str(status)] = {"description": text, "content": _json(_ref("ErrorEnvelope"))}
        if str(status) in _RETRY:
            responses[str(status)]["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return {"summary": summary, **more, "responses": responses}


def _ok(what: str, schema: str) -> dict:
    return {"description": what, "content": _json(_ref(schema))}


def _path_id(name: str, what: str) -> list[dict]:
    return [{"name": name, "in": "path", "required": True, "description": what, "schema": {"type": "string"}}]


def _query(name: str, schema: dict, what: str) -> dict:
    return {"name": name, "in": "query", "required": False, "description": what, "schema": schema}


def _after(what: str) -> dict:
    return _query("after", {"type": "string"}, f"The {what} id to list after (none after an unknown one).")


_UPLOAD = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["file", "purpose"],
            "properties": {
                "file": {
                    "type": "string",
                    "format": "binary",
                    "description": "JSONL: one JSON request object per line.",
                },
                "purpose": {"type": "string", "enum": ["batch"]},
            },
        },
        "encoding": {"file": {"contentType": "application/jsonl, application/octet-stream"}},
    }
}
_NO_FILE = "No such File object of the caller's (another user's files do not exist for them)."
_NO_BATCH = "No such Batch object of the caller's (another user's batches do not exist for them)."


def paths() -> dict:
    file_id = _path_id("file_id", "The file's id, as its upload answered.")
    batch_id = _path_id("batch_id", "The batch's id, as its creation answered.")
    content = {"schema": {"type": "string", "format": "binary"}}
    return {
        "/v1/files": {
            "post": _operation(
                "Upload a batch input file",
                _ok("The stored file.", "FileObject"),
                {
                    400: "Not multipart/form-data, no `file` or `purpose` field, a purpose other than "
                    "`batch`, an empty file, a line that is not a JSON object, or a line over 1 MiB "
                    "(`param` names the field).",
                    413: "The file is over `batch.max_file_megabytes`.",
                },
                requestBody={"required": True, "content": _UPLOAD},
            ),
            "get": _operation(
                "The caller's files",
                _ok("A page of the caller's files.", "FileList"),
                {400: "`limit` is not a whole number from 1 to 10000."},
                parameters=[
                    _query("purpose", {"type": "string"}, "Only files of this purpose."),
                    _query(
                        "order", {"type": "string"}, "`desc` (newest first, the default); else oldest first."
                    ),
                    _query(
                        "limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "At most this many."
                    ),
                    _after("file"),
                ],
            ),
        },
        "/v1/files/{file_id}": {
            "parameters": file_id,
            "get": _operation("A file", _ok("The file.", "FileObject"), {404: _NO_FILE}),
            "delete": _operation("Delete a file", _ok("It is deleted.", "FileDeleted"), {404: _NO_FILE}),
        },
        "/v1/files/{file_id}/content": {
            "parameters": file_id,
            "get": _operation(
                "A file's bytes",
                {
                    "description": "The file as stored (JSONL).",
                    "content": {"application/octet-stream": content, "application/jsonl": content},
                },
                {404: _NO_FILE},
            ),
        },
        "/v1/batches": {
            "post": _operation(
                "Run a batch of requests from an uploaded file",
                _ok("The new batch, `validating`.", "Batch"),
                {
                    400: "The body is not JSON, or a field is missing or wrong: an endpoint not served "
                    "in batch mode, a window not like `24h`, a file not uploaded for `batch` "
                    "(`param` names it).",
                    404: "`input_file_id` is not a file of the caller's.",
                    408: "The request body did not arrive whole within `gateway.body_timeout_s`.",
                    413: "The body is over `gateway.max_body_bytes`.",
                    415: "The body is not declared `Content-Type: application/json`.",
                    429: "The caller has `batch.max_active_batches` batches in progress.",
                },
                requestBody={"required": True, "content": _json(_ref("BatchRequest"))},
            ),
            "get": _operation(
                "The caller's batches, newest first",
                _ok("A page of the caller's batches.", "BatchList"),
                {400: "`limit` is not a whole number from 1 to 100."},
                parameters=[
                    _query(
                        "limit", {"type": "integer", "minimum": 1, "maximum": 100}, "At most this many (20)."
                    ),
                    _after("batch"),
                ],
            ),
        },
        "/v1/batches/{batch_id}": {
            "parameters": batch_id,
            "get": _operation("A batch", _ok("The batch.", "Batch"), {404: _NO_BATCH}),
        },
        "/v1/batches/{batch_id}/cancel": {
            "parameters": batch_id,
            "post": _operation(
                "Cancel a batch",
                _ok(
                    "The batch, now `cancelling` (or as it was: already cancelling, cancelled or finalizing).",
                    "Batch",
                ),
                {
                    404: _NO_BATCH,
                    409: "The batch has already completed, failed or expired (`batch_not_cancellable`).",
                    503: "The batch could not be updated now, or batch mode is not available yet, "
                    "or the gateway has too many open connections. Comes with `Retry-After`.",
                },
            ),
        },
    }
