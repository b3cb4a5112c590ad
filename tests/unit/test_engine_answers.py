"""Reading an engine's answers: server-sent events as they arrive in blocks, and whole answers."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from services.worker.engines import answers
from shared import errors, schema


def event(text: str | None = None, *, index: int = 0, finish: str | None = None, chat: bool = False) -> bytes:
    choice = {"index": index, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": text} if text is not None else {}
    else:
        choice["text"] = text or ""
    return b"data: " + orjson.dumps({"id": "x", "object": "o", "choices": [choice]}) + b"\n\n"


async def blocks_of(*blocks: bytes):
    for block in blocks:
        yield block


async def read(endpoint: schema.Endpoint, *blocks: bytes) -> list:
    return [b async for b in answers.streamed(endpoint, blocks_of(*blocks))]


async def test_one_batch_per_block_with_the_text_joined_and_the_tokens_counted():
    body = b"".join(event(t) for t in ("a", " b", " c"))
    [batch] = await read("completion", body + b"data: [DONE]\n\n")
    assert batch.deltas == [schema.Delta("a b c")] and batch.tokens == 3 and batch.usage is None


async def test_an_event_cut_between_two_reads_is_read_whole():
    whole = event("hello", chat=True) + event(" world", chat=True, finish="stop")
    cut = len(whole) // 2 + 3
    batches = await read("chat", whole[:cut], whole[cut:] + b"data: [DONE]\n\n")
    text = "".join(d.text for b in batches for d in b.deltas)
    assert text == "hello world" and sum(b.tokens for b in batches) == 2
    assert batches[-1].deltas[-1].finish_reason == "stop"


async def test_crlf_lines_comments_and_other_fields_are_ignored():
    body = (
        b": ping\r\n\r\nevent: message\r\n"
        + event("x").replace(b"\n\n", b"\r\n\r\n")
        + b"data: [DONE]\r\n\r\n"
    )
    [batch] = await read("completion", body)
    assert batch.deltas == [schema.Delta("x")]


async def test_choices_stay_apart_and_the_usage_comes_with_the_last_batch():
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}\n\n'
    [batch] = await read(
        "completion", event("a", index=0) + event("b", index=1) + usage + b"data: [DONE]\n\n"
    )
    assert sorted((d.index, d.text) for d in batch.deltas) == [(0, "a"), (1, "b")]
    assert batch.usage == schema.Usage(7, 2)


async def test_what_follows_done_is_read_but_not_parsed():
    batches = await read("completion", event("a") + b"data: [DONE]\n\n", b"not json at all", b"0")
    assert [d.text for b in batches for d in b.deltas] == ["a"]


async def test_an_error_event_is_an_engine_error_with_its_message():
    err = b'data: {"error": {"message": "out of memory", "code": 500}}\n\n'
    with pytest.raises(errors.EngineError, match="out of memory"):
        await read("chat", event("a", chat=True) + err)


async def test_malformed_events_fail_to_decode():
    with pytest.raises(msgspec.DecodeError):
        await read("chat", b"data: {not json}\n\n")
    with pytest.raises(msgspec.DecodeError):
        await read("chat", b'data: {"choices": [{"index": "zero"}]}\n\n')


async def test_hostile_counts_from_an_engine_are_clamped_to_what_the_wire_allows():
    body = b'data: {"choices": [{"index": -4, "text": "a"}], "usage": {"prompt_tokens": -1, "completion_tokens": 1}}\n\n'
    [batch] = await read("completion", body)
    assert batch.deltas[0].index == 0 and batch.usage == schema.Usage(0, 1)


async def test_a_line_that_never_ends_is_refused():
    with pytest.raises(errors.EngineError, match="longer than"):
        await read("chat", b"data: " + b"x" * (answers.MAX_LINE + 10))


def test_a_whole_answer_counts_its_tokens_from_the_usage():
    raw = orjson.dumps(
        {
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }
    )
    batch = answers.whole("chat", raw)
    assert batch.deltas == [schema.Delta("hi there", 0, "stop")] and batch.tokens == 2


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"object": "error", "message": "The model `x` does not exist.", "code": 404}, "does not exist"),
        ({"error": {"message": "too long", "type": "invalid_request_error"}}, "too long"),
        ({"detail": "Not Found"}, "Not Found"),
    ],
)
def test_error_bodies_of_vllm_openai_and_fastapi_are_read(body, said):
    assert said in answers.message(body)
