"""One input line checked before anything runs, and the JSON lines of the output and error files.

A line is OpenAI's batch request ``{"custom_id", "method", "url", "body"}``. What is wrong with
one line (not JSON, a custom_id seen before, another method or url, a body the endpoint would
refuse) becomes that line's entry in the error file; the batch runs the rest.
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import orjson

from shared import errors, schema
from shared.answer import Completion
from shared.openai_protocol import (
    BATCH_ENDPOINTS,
    EmbeddingRequest,
    ResponseShape,
    decode_request,
    parse_request,
)
from shared.vectors import unpack

MAX_CUSTOM_ID = 4096


class InputLine(msgspec.Struct):
    custom_id: str
    method: str
    url: str
    body: msgspec.Raw


_decoder = msgspec.json.Decoder(InputLine)


class LineError(Exception):
    def __init__(self, code: str, message: str, custom_id: str | None = None):
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


class Checker:
    """Checks a batch's lines in order; remembers the custom_ids seen (a 64-bit hash each)."""

    def __init__(self, endpoint: str, model: str = ""):
        self.endpoint = endpoint
        self.kind, self.request_type = BATCH_ENDPOINTS[endpoint]
        self.model = model  # FIRST's route names one model for every line
        self._seen: set[int] = set()

    def check(self, number: int, raw: bytes) -> schema.BatchLine:
        """The line to queue, or LineError saying what is wrong with it."""
        try:
            line = _decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise LineError("invalid_request", f"line {number}: {exc}", _custom_id(raw)) from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            raise LineError("invalid_json", f"line {number} is not a JSON object") from None
        cid = line.custom_id
        if not cid or len(cid) > MAX_CUSTOM_ID:
            raise LineError(
                "invalid_custom_id", f"line {number}: custom_id must be 1 to {MAX_CUSTOM_ID} characters"
            )
        key = hash(cid)
        if key in self._seen:
            raise LineError(
                "duplicate_custom_id", f"line {number}: custom_id {cid!r} is used by an earlier line", cid
            )
        self._seen.add(key)
        if line.method != "POST":
            raise LineError("invalid_method", f"line {number}: method must be POST, not {line.method!r}", cid)
        if line.url != self.endpoint:
            raise LineError(
                "invalid_url",
                f"line {number}: url {line.url!r} is not the batch's endpoint {self.endpoint}",
                cid,
            )
        body = bytes(line.body)
        try:
            request = parse_request(body, self.request_type) if self.kind != "embedding" else _embedding(body)
        except errors.BadRequest as exc:
            raise LineError("invalid_body", f"line {number}: {exc.message}", cid) from None
        if getattr(request, "stream", False):
            raise LineError("invalid_body", f"line {number}: a batch line cannot stream", cid)
        return schema.BatchLine(number, cid, self.model or request.model, self.kind, body)


def _embedding(body: bytes) -> Any:
    return decode_request(body, EmbeddingRequest)


def _custom_id(raw: bytes) -> str | None:
    try:
        value = orjson.loads(raw).get("custom_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# --- the output and error files' lines ---------------------------------------------------------


def answered(line: schema.BatchLine, request_id: str, result: Completion) -> bytes:
    """A line's answer, as OpenAI's output file has it."""
    if line.endpoint == "embedding":
        body = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _vector(line, result.embeddings[i])}
                for i in sorted(result.embeddings)
            ],
            "model": line.model,
            "usage": {
                "prompt_tokens": result.usage.prompt_tokens,
                "total_tokens": result.usage.prompt_tokens,
            },
        }
    else:
        body = ResponseShape(line.endpoint, request_id, line.model).completion(result)
    return orjson.dumps(
        {
            "id": f"batch_req_{request_id}",
            "custom_id": line.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": None,
        }
    )


def _vector(line: schema.BatchLine, vector: bytes) -> list[float] | str:
    if b'"base64"' in line.body:  # encoding_format: the request was checked, so this is it
        return base64.b64encode(vector).decode()
    return unpack(vector)


def refused(line: schema.BatchLine, request_id: str, exc: errors.FirstError) -> bytes:
    """A line the request path answered with an error (the error file's entry)."""
    return orjson.dumps(
        {
            "id": f"batch_req_{request_id}",
            "custom_id": line.custom_id,
            "response": {
                "status_code": exc.status,
                "request_id": request_id,
                "body": {
                    "error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
                },
            },
            "error": None,
        }
    )


def invalid(number: int, exc: LineError) -> bytes:
    """A line refused before it ran: no response, and why."""
    return orjson.dumps(
        {
            "id": f"batch_req_line{number}",
            "custom_id": exc.custom_id,
            "response": None,
            "error": {"code": exc.code, "message": exc.message, "line": number},
        }
    )


def expired(line: schema.BatchLine) -> bytes:
    """A line its batch's completion window ended before (OpenAI's batch_expired)."""
    return orjson.dumps(
        {
            "id": f"batch_req_line{line.line}",
            "custom_id": line.custom_id,
            "response": None,
            "error": {
                "code": "batch_expired",
                "message": "This request could not be executed before the completion window expired.",
            },
        }
    )
