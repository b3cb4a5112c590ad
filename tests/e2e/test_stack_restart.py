"""``first up`` killed outright (SIGKILL) on a deployment whose embedded NATS server keeps its store
and port: the hot model's worker process lives on, reconnects when the stack comes back, and the
new stack's scaler adopts it from the node table instead of starting another; an orderly stop of
the stack then stops it. (Before, a killed scaler took its workers with it, and the hot models
were down until it came back and had loaded them again.)
"""

from __future__ import annotations

import contextlib
import os
import signal

import openai
import orjson
import pytest

from tests.e2e.test_lifecycle import alive, worker_pid
from tests.support import Stack, eventually, free_port

pytestmark = pytest.mark.slow

CONFIG = """
[nats]
url = ""
subject_prefix = "restart"
embedded_store_dir = "store"
embedded_port = {port}

[scaler]
tick_s = 0.2
lease_ttl_s = 1.5

[worker]
heartbeat_s = 0.25

[[clusters]]
name = "c1"

[[models]]
id = "sim/hot"
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 1 }}
scaling = {{ min_hot = 1, max_workers = 1 }}
"""


def logged(stack: Stack, event: str) -> list[dict]:
    out = []
    for line in stack.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            record = orjson.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                out.append(record)
    return out


async def ask(stack: Stack) -> str:
    client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0)
    try:
        answer = await client.chat.completions.create(
            model="sim/hot", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    finally:
        await client.close()
    return answer.choices[0].message.content


async def test_a_killed_stack_leaves_its_hot_worker_and_the_restarted_one_adopts_it(tmp_path):
    text = CONFIG.format(port=free_port())
    first = await Stack(text, tmp_path, name="first").start(ready_models=["sim/hot"])
    pid = worker_pid("c1-n0")
    second = None
    try:
        assert await ask(first)
        first.proc.kill()
        await first.proc.wait()
        assert alive(pid), "the worker died with the stack"

        second = await Stack(text, tmp_path, name="second").start(ready_models=["sim/hot"], timeout=60)
        acting = await eventually(lambda: logged(second, "scaler_acting"), timeout=20, what="the takeover")
        assert len(acting[0]["adopted"]) == 1 and acting[0]["dropped"] == []
        assert await ask(second)
        assert worker_pid("c1-n0") == pid and logged(second, "node_request") == []

        assert await second.stop() == 0  # in order: the adopted worker is stopped too
        await eventually(lambda: not alive(pid), timeout=20, what="the adopted worker to stop")
    finally:
        for stack in (first, second):
            if stack is not None:
                await stack.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
