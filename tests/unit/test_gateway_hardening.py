"""What the gateway refuses before anything travels: hostile bodies, absurd numbers, malformed HTTP."""

from __future__ import annotations

import json

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong, TransferEncodingError

from services.gateway import openapi
from services.gateway.clip import clip
from services.gateway.server import raise_fd_limit, refusal
from shared import errors
from shared.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_request

MESSAGES = [{"role": "user", "content": "hi"}]


def chat_body(**fields) -> bytes:
    # The standard library's json, since orjson refuses integers beyond 64 bits.
    return json.dumps({"model": "m", "messages": MESSAGES} | fields).encode()


def bad_request(raw: bytes, kind=ChatCompletionRequest) -> errors.BadRequest:
    with pytest.raises(errors.BadRequest) as info:
        parse_request(raw, kind)
    return info.value


# --- bodies that used to crash the decoder ---------------------------------------------------------


def test_invalid_utf8_inside_a_string_is_a_bad_request():
    err = bad_request(b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}')
    assert "UTF-8" in err.message


def test_deeply_nested_json_is_a_bad_request():
    deep = b"[" * 1000 + b"]" * 1000
    err = bad_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "x": ' + deep + b"}")
    assert "deeply" in err.message


# --- content parts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("part", "param", "said"),
    [
        ({"type": "text", "text": 5}, "messages[0].content[1].text", "got `int`"),
        ({"type": "text", "text": None}, "messages[0].content[1].text", "got `null`"),
        ({"type": "text", "text": ["a"]}, "messages[0].content[1].text", "got `array`"),
        ({"type": "text"}, "messages[0].content[1].text", "missing required field `text`"),
        ({"text": "no type"}, "messages[0].content[1].type", "missing required field `type`"),
        ({"type": 3}, "messages[0].content[1].type", "got `int`"),
    ],
)
def test_a_malformed_content_part_is_named(part, param, said):
    messages = [{"role": "user", "content": [{"type": "text", "text": "fine"}, part]}]
    err = bad_request(chat_body(messages=messages))
    assert err.param == param and said in err.message


def test_parts_of_other_types_pass_untouched():
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}, "text": 5},
        {"type": "text", "text": "describe"},
    ]
    req = parse_request(chat_body(messages=[{"role": "user", "content": parts}]), ChatCompletionRequest)
    assert req.messages[0].content == parts


# --- bounds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": "m" * 257}, "model"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"max_completion_tokens": 10**30}, "max_completion_tokens"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 10**30}, "seed"),
        ({"n": 10**30}, "n"),
    ],
)
def test_absurd_values_are_refused_naming_the_field(fields, param):
    assert bad_request(chat_body(**fields)).param == param


def test_values_at_the_bounds_are_taken():
    req = parse_request(
        chat_body(model="m" * 256, max_tokens=2**31 - 1, max_completion_tokens=2**31 - 1, seed=-(2**63)),
        ChatCompletionRequest,
    )
    assert req.max_tokens == 2**31 - 1 and req.seed == -(2**63)
    assert parse_request(b'{"model": "m", "prompt": "p", "seed": 9223372036854775807}', CompletionRequest)


# --- clipping ------------------------------------------------------------------------------------------


def test_clip_keeps_short_strings_and_marks_cut_ones():
    assert clip("short") == "short" and clip(None) is None
    cut = clip("x" * 10_000)
    assert cut.startswith("x" * 128) and cut.endswith("...[10000 chars]") and len(cut) < 150


# --- aiohttp's own refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (LineTooLong(b"aaaa...", 8190), 431, "headers_too_large"),
        (BadHttpMessage("Too many headers received"), 431, "headers_too_large"),
        (BadHttpMethod(error="Invalid method encountered:\n\n  b'GARBAGE'\n     ^"), 400, "invalid_request"),
        (TransferEncodingError("Invalid character in chunk size:\n\n  b'zz'\n    ^"), 400, "invalid_request"),
    ],
)
def test_parser_refusals_map_to_statuses_without_echoing_the_bytes(exc, status, code):
    err = refusal(exc, 400)
    assert (err.status, err.code, err.type) == (status, code, "invalid_request_error")
    assert "b'" not in err.message and "\n" not in err.message


def test_anything_else_reaching_aiohttps_handler_is_an_internal_error():
    err = refusal(RuntimeError("bug"), 500)
    assert (err.status, err.code) == (500, "internal_error")


# --- the OpenAPI document --------------------------------------------------------------------------------


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_openapi_document_describes_every_route_and_resolves():
    doc = openapi.build()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/health",
        "/openapi.json",
        "/v1/files",
        "/v1/files/{file_id}",
        "/v1/files/{file_id}/content",
        "/v1/batches",
        "/v1/batches/{batch_id}",
        "/v1/batches/{batch_id}/cancel",
    }
    for ref in _refs(doc):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionRequest"
    )
    assert {"application/json", "text/event-stream"} <= set(chat["responses"]["200"]["content"])
    assert {"400", "404", "413", "415", "503"} <= set(chat["responses"])
    request = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert request["properties"]["model"]["maxLength"] == 256
    assert doc["components"]["responses"]["Error415"]["content"]["application/json"]["schema"][
        "$ref"
    ].endswith("/ErrorEnvelope")


def test_openapi_document_is_valid_openapi_31():
    # schemathesis carries the OpenAPI 3.1 meta-schema (an internal module: pinned below 5).
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    assert [str(e) for e in OPENAPI_31_VALIDATOR.iter_errors(openapi.build())] == []


# --- file descriptors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("soft", "hard", "wanted"),
    [(1024, 4096, 1280), (1024, 1100, 1100), (4096, 4096, None), (1024, -1, 1280)],
)
def test_the_soft_fd_limit_is_raised_to_fit_max_connections(monkeypatch, soft, hard, wanted):
    import resource

    calls = []
    monkeypatch.setattr(resource, "RLIM_INFINITY", -1)
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda _which, limits: calls.append(limits))
    raise_fd_limit(1024)
    assert calls == ([] if wanted is None else [(wanted, hard)])
