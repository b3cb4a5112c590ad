"""The simulated engine: deterministic text, exact token counts, and a real concurrency limit."""

from __future__ import annotations

import asyncio
import time

from services.worker.engines.sim import SimulatedEngine, natural_length
from shared import schema
from shared.config import SimEngine


def engine(**kw) -> SimulatedEngine:
    settings = {"ttft_ms": 0.0, "itl_ms": 0.0, "default_max_tokens": 64} | kw
    return SimulatedEngine(SimEngine(**settings))


def chat(text: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": text}], **kw}


async def run(eng: SimulatedEngine, body: dict, endpoint: str = "chat"):
    batches = [b async for b in eng.generate(endpoint, body)]
    events = [e for b in batches for e in [*b.deltas, *([b.usage] if b.usage else [])]]
    deltas = [e for e in events if isinstance(e, schema.Delta)]
    usages = [e for e in events if isinstance(e, schema.Usage)]
    assert len(usages) == 1 and events[-1] is usages[0], "exactly one Usage, last"
    return "".join(d.text for d in deltas), deltas, usages[0]


async def test_same_prompt_and_seed_give_the_same_text():
    first, _, _ = await run(engine(), chat("tell me about nats", seed=7))
    second, _, _ = await run(engine(), chat("tell me about nats", seed=7))
    assert first and first == second


async def test_different_seed_gives_different_text():
    texts = {(await run(engine(), chat("tell me about nats", seed=s)))[0] for s in range(5)}
    assert len(texts) > 1


async def test_exactly_one_finish_reason_and_token_counts_match():
    prompt = "how  many\twords are\nhere"
    text, deltas, usage = await run(engine(), chat(prompt, seed=1))
    finishes = [d.finish_reason for d in deltas if d.finish_reason]
    assert finishes == ["stop"]
    tokens = [d for d in deltas if d.text]
    assert usage.completion_tokens == len(tokens) == len(text.split())
    assert usage.prompt_tokens == 5


async def test_max_tokens_below_natural_length_stops_with_length():
    prompt = "a long answer please"
    assert natural_length(prompt, 3) > 4
    text, deltas, usage = await run(engine(), chat(prompt, seed=3, max_tokens=4))
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
    assert usage.completion_tokens == 4 == len(text.split())


async def test_max_completion_tokens_is_honoured_for_chat():
    _, _, usage = await run(engine(), chat("x y z", seed=3, max_completion_tokens=2))
    assert usage.completion_tokens == 2


async def test_default_max_tokens_applies_when_the_request_sets_none():
    _, deltas, usage = await run(engine(default_max_tokens=3), chat("q", seed=0))
    assert usage.completion_tokens == 3
    assert deltas[-1].finish_reason == "length"


async def test_completion_endpoint_counts_the_prompt_words():
    text, deltas, usage = await run(engine(), {"prompt": "once upon a time", "seed": 2}, "completion")
    assert text and usage.prompt_tokens == 4
    assert usage.completion_tokens == len(text.split())
    assert sum(1 for d in deltas if d.finish_reason) == 1


async def test_chat_and_completion_of_the_same_text_agree():
    chat_text, _, _ = await run(engine(), chat("same words", seed=9))
    completion_text, _, _ = await run(engine(), {"prompt": "same words", "seed": 9}, "completion")
    assert chat_text == completion_text


async def test_stop_word_ends_the_answer_without_sending_it():
    full, _, _ = await run(engine(), chat("stop test", seed=4))
    words = full.split()
    stop = words[2]
    first = words.index(stop)
    text, deltas, usage = await run(engine(), chat("stop test", seed=4, stop=stop))
    assert text.split() == words[:first]
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
    assert usage.completion_tokens == first


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.001)


async def test_requests_beyond_max_concurrency_wait_inside_the_engine():
    eng = engine(ttft_ms=1.0, itl_ms=1.0, max_concurrency=1)
    assert await eng.load() == schema.EngineLoad(running=0, waiting=0)
    gen_a = eng.generate("chat", chat("first", seed=1))
    [first_delta] = (await gen_a.__anext__()).deltas  # a holds the only slot while it is suspended here
    assert isinstance(first_delta, schema.Delta)
    b = asyncio.create_task(run(eng, chat("second", seed=2)))

    async def one_waiting() -> bool:
        return (await eng.load()) == schema.EngineLoad(running=1, waiting=1)

    await wait_for(one_waiting)
    assert not b.done()
    rest = [b async for b in gen_a]
    assert rest[-1].usage is not None
    _, _, usage_b = await asyncio.wait_for(b, 5)
    assert usage_b.completion_tokens > 0
    assert await eng.load() == schema.EngineLoad(running=0, waiting=0)


async def test_a_cancelled_request_frees_its_slot():
    eng = engine(ttft_ms=1.0, itl_ms=1.0, max_concurrency=1)
    gen = eng.generate("chat", chat("first", seed=1))
    await gen.__anext__()
    await gen.aclose()  # the client went away
    assert await eng.load() == schema.EngineLoad(running=0, waiting=0)
    _, _, usage = await asyncio.wait_for(run(eng, chat("next", seed=1)), 5)
    assert usage.completion_tokens > 0


async def test_start_and_stop_without_load_time_return_at_once():
    eng = engine(load_s=0.0)
    await asyncio.wait_for(eng.start(), 1)
    await eng.stop()
