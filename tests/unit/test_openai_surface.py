"""The OpenAI surface: what a client sees when its request is malformed, and the SSE stream it reads."""

from __future__ import annotations

import orjson
import pytest

from services.gateway.sse import DONE, ChunkFramer
from shared import errors
from shared.openai_protocol import ChatCompletionRequest, CompletionRequest, ResponseShape, parse_request
from shared.schema import Chunk, Delta, Usage

MESSAGES = [{"role": "user", "content": "hi"}]


def chat_body(**fields) -> bytes:
    return orjson.dumps({"model": "m", "messages": MESSAGES} | fields)


def bad_request(raw: bytes, kind=ChatCompletionRequest) -> errors.BadRequest:
    with pytest.raises(errors.BadRequest) as info:
        parse_request(raw, kind)
    assert info.value.status == 400
    return info.value


# --- parsing ----------------------------------------------------------------------------------


def test_valid_chat_request_parses_and_keeps_settings():
    req = parse_request(chat_body(stream=True, stream_options={"include_usage": True}), ChatCompletionRequest)
    assert req.model == "m" and req.messages[0].content == "hi"
    assert req.include_usage


def test_unknown_extra_fields_are_accepted():
    req = parse_request(chat_body(logit_bias={"1": 2}, vendor_knob=[1, 2], n=1), ChatCompletionRequest)
    assert req.model == "m"


@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"model": "m",}'])
def test_malformed_json_is_a_bad_request(raw):
    assert "not valid JSON" in bad_request(raw).message


def test_empty_body_is_a_bad_request():
    assert "empty" in bad_request(b"  ").message


def test_missing_model_names_the_model_param():
    assert bad_request(orjson.dumps({"messages": MESSAGES})).param == "model"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": 1, "content": "x"}]}, "messages[0].role"),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"model": 5}, "model"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_wrong_values_name_the_offending_field(fields, param):
    assert bad_request(chat_body(**fields)).param == param


def test_more_than_one_choice_is_refused():
    err = bad_request(chat_body(n=2))
    assert err.param == "n"


def test_completion_request_checks_prompt_and_echo():
    ok = parse_request(b'{"model": "m", "prompt": "once"}', CompletionRequest)
    assert ok.prompt == "once"
    assert bad_request(b'{"model": "m"}', CompletionRequest).param == "prompt"
    assert bad_request(b'{"model": "m", "prompt": "a", "echo": true}', CompletionRequest).param == "echo"


# --- streaming --------------------------------------------------------------------------------


def events(stream: bytes) -> list[dict]:
    """Split the SSE bytes as a client would; every event must be ``data: ...`` and end in [DONE]."""
    assert stream.endswith(DONE)
    parts = stream.split(b"\n\n")
    assert parts[-1] == b"" and parts[-2] == b"data: [DONE]"
    assert stream.count(b"data: [DONE]") == 1
    out = []
    for part in parts[:-2]:
        assert part.startswith(b"data: "), part
        out.append(orjson.loads(part[len(b"data: ") :]))
    return out


def stream_of(chunks: list[Chunk], *, endpoint="chat", include_usage=False) -> list[dict]:
    framer = ChunkFramer(ResponseShape(endpoint, "req1", "m", include_usage=include_usage))
    return events(b"".join(framer.frame(c) for c in chunks))


def finishes(evts: list[dict]) -> list[str]:
    return [c["finish_reason"] for e in evts for c in e["choices"] if c["finish_reason"]]


def content(evts: list[dict]) -> str:
    return "".join(c["delta"].get("content", "") for e in evts for c in e["choices"])


CHUNKS = [
    Chunk("r", 0, [Delta("Hel")]),
    Chunk("r", 1, [Delta("lo"), Delta(","), Delta(" world", finish_reason="stop")]),
    Chunk("r", 2, usage=Usage(prompt_tokens=5, completion_tokens=4), done=True),
]


def test_chat_stream_opens_with_the_assistant_role_and_carries_the_text():
    evts = stream_of(CHUNKS)
    assert evts[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == "chatcmpl-req1" for e in evts)
    assert content(evts) == "Hello, world"
    assert finishes(evts) == ["stop"]


def test_tokens_that_travelled_together_become_one_event_per_choice():
    framer = ChunkFramer(ResponseShape("chat", "r", "m"))
    framer.frame(CHUNKS[0])
    raw = framer.frame(Chunk("r", 1, [Delta("a"), Delta("b", index=1), Delta("c")]))
    events = [orjson.loads(line[6:]) for line in raw.split(b"\n\n") if line.startswith(b"data: {")]
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events] == [
        (0, {"content": "ac"}),
        (1, {"role": "assistant", "content": ""}),
        (1, {"content": "b"}),
    ]
    assert b"[DONE]" not in raw


def test_a_finish_reason_is_sent_even_when_the_wire_never_sent_one():
    evts = stream_of([Chunk("r", 0, [Delta("x")]), Chunk("r", 1, done=True)])
    assert finishes(evts) == ["stop"]


def test_a_repeated_finish_reason_is_sent_only_once():
    chunks = [
        Chunk("r", 0, [Delta("x", finish_reason="length")]),
        Chunk("r", 1, [Delta("", finish_reason="length")]),
    ]
    evts = stream_of([*chunks, Chunk("r", 2, done=True)])
    assert finishes(evts) == ["length"]


def test_an_empty_answer_still_has_a_role_a_finish_and_done():
    evts = stream_of([Chunk("r", 0, done=True)])
    assert evts[0]["choices"][0]["delta"]["role"] == "assistant"
    assert finishes(evts) == ["stop"]


def test_usage_chunk_comes_last_with_no_choices_and_correct_totals():
    evts = stream_of(CHUNKS, include_usage=True)
    last = evts[-1]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert all(e["usage"] is None for e in evts[:-1])


def test_no_usage_chunk_unless_asked_for():
    evts = stream_of(CHUNKS)
    assert all(e["choices"] for e in evts)
    assert all("usage" not in e for e in evts)


def test_completion_stream_uses_text_and_text_completion_object():
    evts = stream_of(CHUNKS, endpoint="completion", include_usage=True)
    body = evts[:-1]
    assert all(e["object"] == "text_completion" and e["id"] == "cmpl-req1" for e in evts)
    assert all("delta" not in c and "text" in c for e in body for c in e["choices"])
    assert "".join(c["text"] for e in body for c in e["choices"]) == "Hello, world"
    assert finishes(evts) == ["stop"]
    assert evts[-1]["usage"]["total_tokens"] == 9


def test_openais_flex_service_tier_is_the_batch_class():
    from shared.openai_protocol import ChatCompletionRequest, parse_request

    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]'
    assert parse_request(body + b',"service_tier":"flex"}', ChatCompletionRequest).priority == "batch"
    assert (
        parse_request(body + b',"service_tier":"default"}', ChatCompletionRequest).priority == "interactive"
    )
    assert parse_request(body + b"}", ChatCompletionRequest).priority == "interactive"
