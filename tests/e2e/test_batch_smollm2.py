"""A real batch: 200 lines through ``first up`` on compose/first.local.toml (embedded nats-server,
llama.cpp server, SmolLM2-135M-Instruct on the CPU), uploaded and fetched with the openai SDK."""

from __future__ import annotations

import io

import openai
import orjson
import pytest

from tests.support import ROOT, Stack, eventually

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LINES = 200
pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]


async def test_smollm2_answers_a_200_line_batch(tmp_path):
    stack = Stack((ROOT / "compose" / "first.local.toml").read_text(), tmp_path, name="local")
    await stack.start(ready_models=[MODEL], timeout=120)
    client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        lines = [
            {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                      "max_tokens": 6, "temperature": 0}}
            for i in range(LINES)
        ]  # fmt: skip
        data = b"".join(orjson.dumps(line) + b"\n" for line in lines)
        upload = await client.files.create(file=("q.jsonl", io.BytesIO(data)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        async def done():
            b = await client.batches.retrieve(batch.id)
            assert b.status not in ("failed", "cancelled", "expired"), b
            return b if b.status == "completed" else None

        batch = await eventually(done, timeout=600, interval=1.0, what="the SmolLM2 batch to complete")
        assert (batch.request_counts.completed, batch.request_counts.failed) == (LINES, 0)
        out = [
            orjson.loads(x) for x in (await client.files.content(batch.output_file_id)).content.splitlines()
        ]
        assert sorted(o["custom_id"] for o in out) == sorted(f"q{i}" for i in range(LINES))
        for o in out:
            body = o["response"]["body"]
            assert body["model"] == MODEL and body["choices"][0]["message"]["content"].strip()
            assert 0 < body["usage"]["completion_tokens"] <= 6
    finally:
        await client.close()
        assert await stack.stop() == 0, stack.log_tail()
