"""Reading an OpenAI-compatible engine's answers: server-sent events, or one JSON object.

Decoded with msgspec into the few fields the worker needs (the rest is skipped, not built), and
the events that one network read brought are decoded in one call: a fast engine writes dozens at
once. An engine is trusted only as far as the wire schema allows: counts are clamped, and an
answer that does not decode is the engine's failure (``msgspec.DecodeError``, which the engine
turns into a 502).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from services.worker.engines.base import Batch
from shared import errors, schema

MAX_LINE = 16 << 20  # an event line longer than this is not an answer


class _Text(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    text: str | None = None  # completions
    delta: _Text | None = None  # chat, streamed
    message: _Text | None = None  # chat, whole
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Answer(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: Any = None


# Each event's payload, in one pass (a greedy match: a lazy one backtracks at every character).
_DATA = re.compile(rb"^data:[ \t]*(.*)$", re.MULTILINE)
_one = msgspec.json.Decoder(_Answer)
_many = msgspec.json.Decoder(list[_Answer])


async def streamed(endpoint: schema.Endpoint, blocks: AsyncIterator[bytes]) -> AsyncIterator[Batch]:
    """The events of a server-sent event stream, one list per block of the body as it came (what
    one network read brought), up to ``[DONE]``."""
    rest = b""
    async for block in blocks:
        buf = rest + block
        cut = buf.rfind(b"\n") + 1  # whole lines only; the rest waits for the next block
        rest = buf[cut:]
        if len(rest) > MAX_LINE:
            raise errors.EngineError("the engine sent an event line longer than 16 MiB")
        payloads = [p.rstrip() for p in _DATA.findall(buf, 0, cut)]
        done = b"[DONE]" in payloads
        if done:
            payloads = payloads[: payloads.index(b"[DONE]")]
        if payloads:
            yield batch(endpoint, _many.decode(b"[" + b",".join(payloads) + b"]"))
        if done:
            break
    else:
        if rest.startswith(b"data:") and (last := rest[5:].strip()) != b"[DONE]":
            yield batch(endpoint, [_one.decode(last)])
        return
    # After [DONE], read the body to its end (a few bytes at most), so that the connection can
    # serve the next request rather than be closed.
    drained = 0
    async for block in blocks:
        drained += len(block)
        if drained > MAX_LINE:
            break


def whole(endpoint: schema.Endpoint, raw: bytes) -> Batch:
    """A whole (not streamed) answer as one batch; its tokens are the engine's usage, if given."""
    result = batch(endpoint, [_one.decode(raw)])
    if result.usage is not None:
        result.tokens = result.usage.completion_tokens
    return result


def batch(endpoint: schema.Endpoint, answers: list[_Answer]) -> Batch:
    """Events of one read, joined per choice: each event with text is one token."""
    texts: dict[int, list[str]] = {}
    finishes: dict[int, str] = {}
    result = Batch()
    for answer in answers:
        if answer.error:
            raise errors.EngineError(f"the engine failed mid-answer: {message(answer.error)[:500]}")
        for c in answer.choices:
            if endpoint == "completion":
                text = c.text
            else:
                part = c.delta or c.message
                text = part.content if part is not None else None
            index = _count(c.index, 1024)
            if text:
                texts.setdefault(index, []).append(text)
                result.tokens += 1
            if c.finish_reason:
                finishes[index] = c.finish_reason
                texts.setdefault(index, [])
        if (u := answer.usage) is not None:
            result.usage = schema.Usage(_count(u.prompt_tokens), _count(u.completion_tokens))
    result.deltas = [schema.Delta("".join(t), i, finishes.get(i)) for i, t in texts.items()]
    return result


def message(payload: object) -> str:
    """The human part of an engine's error body (OpenAI's nested one or vLLM's flat one)."""
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err or payload.get("message") or payload.get("detail") or payload)
    return str(payload)


def _count(value: int, top: int = 1_000_000_000) -> int:
    return value if 0 <= value <= top else 0
