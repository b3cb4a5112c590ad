"""The OpenAI surface: request shapes we check, and the exact response shapes we send.

Lenient in: unknown request fields are accepted and travel to the engine untouched (the worker
receives the client's body as sent). These Structs only check what the gateway must rely on.
Exact out: responses and stream chunks are built here and nowhere else.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

import msgspec

from shared import errors, schema
from shared.answer import Completion
from shared.vectors import MAX_INPUTS

# Bounds that no sane request reaches: engines keep token counts in 32 bits and seeds in 64.
INT32_MAX = 2**31 - 1
MAX_MODEL_LENGTH = 256
Count = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
ModelName = Annotated[str, msgspec.Meta(max_length=MAX_MODEL_LENGTH)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
Unit = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    model: ModelName
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Count | None = None
    temperature: Temperature | None = None
    top_p: Unit | None = None
    n: Annotated[Count, msgspec.Meta(description="Only 1 is supported.")] | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    # OpenAI's "flex" (cheaper, slower) is our batch class: it waits behind interactive requests.
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # a session key (routers keep a session on one worker)

    @property
    def priority(self) -> schema.Priority:
        return "batch" if self.service_tier == "flex" else "interactive"

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


# Content parts travel to the engine as sent. Only text parts are read here, and their ``text``
# must be a string (check_content); the schema says so for the OpenAPI document.
_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
_OTHER_PART = {
    "type": "object",
    "properties": {"type": {"type": "string", "not": {"const": "text"}}},
    "required": ["type"],
}
ContentPart = Annotated[dict[str, Any], msgspec.Meta(extra_json_schema={"anyOf": [_TEXT_PART, _OTHER_PART]})]


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: Count | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    echo: Annotated[bool, msgspec.Meta(description="Only false is supported.")] = False


_PATH = re.compile(r"at `\$\.?(.*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def parse_request(raw: bytes, kind: type[msgspec.Struct]) -> Any:
    """Decode and check a request body, or raise BadRequest naming the offending field."""
    request = decode_request(raw, kind)
    if isinstance(request, ChatCompletionRequest):
        check_content(request.messages)
    if request.n not in (None, 1):
        raise errors.BadRequest("Only n=1 is supported.", param="n")
    if isinstance(request, CompletionRequest) and request.echo:
        raise errors.BadRequest("echo is not supported.", param="echo")
    return request


def decode_request(raw: bytes, kind: type[msgspec.Struct]) -> Any:
    """Decode a request body into ``kind``, or raise BadRequest naming the offending field."""
    if not raw.strip():
        raise errors.BadRequest("The request body is empty; send a JSON object.")
    try:
        request = msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _PATH.search(text) or _MISSING.search(text)
        raise errors.BadRequest(text, param=m.group(1) if m else None) from None
    except msgspec.DecodeError as exc:
        raise errors.BadRequest(f"The request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        # msgspec checks UTF-8 only inside strings, and says so with a bare UnicodeDecodeError.
        raise errors.BadRequest("The request body is not valid JSON: a string in it is not UTF-8.") from None
    except RecursionError:
        raise errors.BadRequest("The request body nests arrays or objects too deeply.") from None
    return request


def check_content(messages: list[ChatMessage]) -> None:
    """Content parts need a string ``type``, and text parts a string ``text``; others pass as sent."""
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            _require_str(part, "type", where)
            if part["type"] == "text":
                _require_str(part, "text", where)


_JSON_TYPES = {type(None): "null", bool: "bool", int: "int", float: "float", list: "array", dict: "object"}


def _require_str(part: dict[str, Any], key: str, where: str) -> None:
    # Worded as msgspec words its own errors, so every 400 reads alike.
    if key not in part:
        raise errors.BadRequest(
            f"Object missing required field `{key}` - at `$.{where}`", param=f"{where}.{key}"
        )
    if not isinstance(part[key], str):
        got = _JSON_TYPES.get(type(part[key]), type(part[key]).__name__)
        raise errors.BadRequest(f"Expected `str`, got `{got}` - at `$.{where}.{key}`", param=f"{where}.{key}")


SESSION_HEADER = "X-ALCF-Session-ID"  # FIRST's
_SESSION = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII, as FIRST checks it


def session_key(header: str | None, req: Any) -> str:
    """The key that keeps a conversation on one worker: FIRST's header, else OpenAI's
    prompt_cache_key, else its user; "" for none. A header FIRST would refuse is a 400."""
    if header is not None:
        if not _SESSION.fullmatch(header):
            raise errors.BadRequest(f"{SESSION_HEADER} must be 1 to 128 visible ASCII characters.")
        return header
    key = req.prompt_cache_key or req.user or ""
    return key[:128]


def error_body(exc: errors.FirstError) -> dict:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def _usage(u: schema.Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


class ResponseShape:
    """Builds one request's OpenAI objects: ids, timestamps and the model name stay the same throughout."""

    def __init__(self, endpoint: schema.Endpoint, request_id: str, model: str, include_usage: bool = False):
        self.endpoint = endpoint
        self.id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self._chunk_object = "chat.completion.chunk" if endpoint == "chat" else "text_completion"

    def completion(self, result: Completion) -> dict:
        choices = []
        for index in sorted(result.texts.keys() | result.finish_reasons.keys()) or [0]:
            text, finish = result.texts.get(index, ""), result.finish_reasons.get(index, "stop")
            if self.endpoint == "chat":
                choice = {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            else:
                choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            choices.append(choice)
        return {
            "id": self.id,
            "object": "chat.completion" if self.endpoint == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": _usage(result.usage),
        }

    def chunk(
        self, index: int, *, text: str | None = None, finish: str | None = None, role: bool = False
    ) -> dict:
        if self.endpoint == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        out = {
            "id": self.id,
            "object": self._chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: schema.Usage) -> dict:
        return {
            "id": self.id,
            "object": self._chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": _usage(usage),
        }


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    # A string, a list of strings, a list of token ids, or a list of lists of token ids (msgspec
    # takes one list type in a union: vectors.inputs checks the items).
    input: str | Annotated[list[Any], msgspec.Meta(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None


# What a batch may run, by the url its lines name (OpenAI's batch endpoint values).
BATCH_ENDPOINTS: dict[str, tuple[schema.Endpoint, type[msgspec.Struct]]] = {
    "/v1/chat/completions": ("chat", ChatCompletionRequest),
    "/v1/completions": ("completion", CompletionRequest),
    "/v1/embeddings": ("embedding", EmbeddingRequest),
}
