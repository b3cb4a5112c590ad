"""The OpenAPI 3.1 document served at ``GET /openapi.json``, built once when the app is made.

Request bodies are described by the very msgspec Structs that check them (protocol.py). The
response Structs below exist only for this document: they mirror what ``ResponseShape`` and the
handlers build, and the fuzz test (tests/fuzz) checks live answers against them.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Literal

import msgspec
import orjson
from aiohttp import web

from services.gateway import openapi_batch
from services.gateway.middleware import Handler
from shared.openai_protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

# --- response shapes, for the document only ----------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(msgspec.Struct):
    role: Literal["assistant"] | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET


class ChunkChoice(msgspec.Struct):
    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(msgspec.Struct):
    """One ``data:`` event of a streamed chat answer; with ``include_usage``, the last has no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | msgspec.UnsetType | None = msgspec.UNSET


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class TextCompletion(msgspec.Struct):
    """A completion, or one ``data:`` event of a streamed one (``finish_reason`` null until the end)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | msgspec.UnsetType | None = msgspec.UNSET


class Model(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    status: str  # live, starting, queued or offline
    clusters: list[str]
    queued: int
    workers: int


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[Model]


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(msgspec.Struct):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of float32 little-endian


class EmbeddingList(msgspec.Struct):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class Health(msgspec.Struct):
    status: Literal["ok", "degraded"]
    nats: bool


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(msgspec.Struct):
    """Every error, whatever its status."""

    error: ErrorDetail


# --- the document --------------------------------------------------------------------------------

_ERRORS = {
    400: "The body is not JSON or a field is missing or out of range (`param` names it), or the HTTP "
    "request itself is malformed.",
    404: "The model is not served here (`model_not_found`).",
    408: "The request body did not arrive whole within `gateway.body_timeout_s`.",
    413: "The body is over `gateway.max_body_bytes`, or the request over the NATS server's `max_payload`.",
    415: "The body is not declared `Content-Type: application/json`.",
    431: "The request line or a header field is over 8190 bytes, or there are over 128 header fields.",
    500: "A bug; it is logged with the request id.",
    502: "The engine failed, or the worker stopped mid-answer.",
    503: "No capacity: no router, the model's queue is full, no worker in time, or the gateway has "
    "too many open connections. Comes with `Retry-After`.",
    504: "No worker started the request within `gateway.request_timeout_s`, or its answer went silent.",
}
# Any request can be refused before routing: a malformed head, oversized headers, a full gateway.
_EDGE = (400, 431, 500, 503)
_INFER = (400, 404, 408, 413, 415, 431, 500, 502, 503, 504)


def _event(chunk: str) -> dict:
    """One server-sent event, as tools read ``text/event-stream`` before OpenAPI 3.2's itemSchema:
    its ``data`` is a chunk, then ``[DONE]``; an error after the first event is a last chunk-like
    ``{"error": ...}`` event before ``[DONE]``."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorEnvelope")]},
    }
    return {
        "type": "object",
        "description": f"A server-sent event: `data: <{chunk} as JSON>`, and last `data: [DONE]`.",
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
        "required": ["data"],
    }


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _responses(ok: dict, statuses: tuple[int, ...]) -> dict:
    out: dict[str, Any] = {"200": ok}
    for status in statuses:
        out[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    return out


def _infer_operation(summary: str, request: str, answer: str, chunk: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(_ref(request))},
            "responses": _responses(
                {
                    "description": f"The answer; with `stream: true`, a stream of {chunk} events.",
                    "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
                    "content": {
                        **_json(_ref(answer)),
                        "text/event-stream": {"schema": _event(chunk)},
                    },
                },
                _INFER,
            ),
        }
    }


def _get_operation(summary: str, ok: dict, statuses: tuple[int, ...] = _EDGE) -> dict:
    return {"get": {"summary": summary, "responses": _responses(ok, statuses)}}


def build() -> dict:
    """The whole document, as a dict."""
    _, schemas = msgspec.json.schema_components(
        [
            ChatCompletionRequest,
            CompletionRequest,
            ChatCompletion,
            ChatCompletionChunk,
            TextCompletion,
            ModelList,
            EmbeddingRequest,
            EmbeddingList,
            Health,
            ErrorEnvelope,
            *openapi_batch.SCHEMAS,
        ],
        ref_template="#/components/schemas/{name}",
    )
    openapi_batch.refine(schemas)
    errors = {
        f"Error{status}": {"description": text, "content": _json(_ref("ErrorEnvelope"))}
        for status, text in _ERRORS.items()
    }
    errors["Error503"]["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    health_down = {"anyOf": [_ref("Health"), _ref("ErrorEnvelope")]}
    paths = {
        "/v1/chat/completions": _infer_operation(
            "Chat completion", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"
        ),
        "/v1/completions": _infer_operation(
            "Text completion", "CompletionRequest", "TextCompletion", "TextCompletion"
        ),
        "/v1/embeddings": {
            "post": {
                "summary": "Embeddings: a vector per input",
                "requestBody": {"required": True, "content": _json(_ref("EmbeddingRequest"))},
                "responses": _responses(
                    {
                        "description": "The vectors, as floats or (encoding_format: base64) float32 bytes.",
                        "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
                        "content": _json(_ref("EmbeddingList")),
                    },
                    _INFER,
                ),
            }
        },
        "/v1/models": _get_operation(
            "The configured models, with their live status",
            {"description": "The models.", "content": _json(_ref("ModelList"))},
        ),
        "/health": {
            "get": {
                "summary": "Whether the gateway is up and connected to NATS",
                "responses": {
                    "200": {"description": "Up, with NATS.", "content": _json(_ref("Health"))},
                    "503": {
                        "description": "NATS is lost (`degraded`), or too many open connections.",
                        "content": _json(health_down),
                    },
                    **{str(s): {"$ref": f"#/components/responses/Error{s}"} for s in (400, 431, 500)},
                },
            }
        },
        "/openapi.json": _get_operation(
            "This document", {"description": "OpenAPI 3.1.", "content": _json({"type": "object"})}
        ),
        **openapi_batch.paths(),  # batch mode: /v1/files, /v1/batches
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "FIRST on NATS",
            "version": _version(),
            "description": "An OpenAI-compatible inference gateway. Every error has OpenAI's envelope.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": errors,
            "headers": {
                "X-Request-Id": {
                    "description": "The request's id, in every log line it left across services.",
                    "schema": {"type": "string"},
                },
                "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}},
            },
        },
    }


def _version() -> str:
    try:
        return metadata.version("first-nats")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def handler() -> Handler:
    """``GET /openapi.json``: the document is encoded once, here."""
    body = orjson.dumps(build())

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return openapi
