"""Batch mode through the openai SDK, unmodified, against ``first up`` on its embedded NATS (NATS
permissions on, as deployed) with simulated engines: upload, create, poll, download, cancel, and
the errors a user sees for files that are not what a batch needs."""

from __future__ import annotations

import asyncio
import io
import sys
import uuid

import aiohttp
import openai
import orjson
import pytest

from tests.support import ROOT, Stack, eventually

BATCH_STACK = """
[nats]
url = ""
embedded_store_dir = "{store}"

[gateway]
request_timeout_s = 30

[scaler]
tick_s = 0.2

[worker]
heartbeat_s = 0.25

[batch]
max_file_megabytes = 1
max_active_batches = 3
progress_s = 0.2

[[clusters]]
name = "polaris"

[[models]]
id = "sim/fast"
capacity = 16
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 1 }}
scaling = {{ min_hot = 1, max_workers = 1 }}

[[models]]
id = "sim/slow"
capacity = 1
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 200, default_max_tokens = 10 }}
scaling = {{ min_hot = 1, max_workers = 1 }}
"""


@pytest.fixture(scope="module")
async def batch_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    stack = Stack(BATCH_STACK.format(store=tmp / "nats"), tmp, name="batch")
    await stack.start(ready_models=["sim/fast", "sim/slow"])
    yield stack
    code = await stack.stop()
    assert code == 0, f"first up exited with {code} on SIGINT:\n{stack.log_tail()}"


@pytest.fixture
async def oai(batch_stack):
    client = openai.AsyncOpenAI(
        base_url=batch_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=30
    )
    yield client
    await client.close()


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def chat_line(i: int, model: str = "sim/fast", **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4}
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body, **extra}


async def finished(oai, batch_id: str, timeout: float = 60.0):
    async def done():
        batch = await oai.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "cancelled", "expired") else None

    return await eventually(done, timeout=timeout, interval=0.2, what=f"batch {batch_id} to end")


async def test_a_batch_round_trips_through_the_openai_sdk(oai):
    upload = await oai.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([chat_line(i) for i in range(40)]))), purpose="batch"
    )
    assert upload.purpose == "batch" and upload.bytes > 0 and upload.filename == "in.jsonl"
    batch = await oai.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "1"},
    )
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "1"}
    batch = await finished(oai, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        40,
        40,
        0,
    )
    assert batch.error_file_id is None and batch.completed_at and batch.in_progress_at
    out = [
        orjson.loads(line) for line in (await oai.files.content(batch.output_file_id)).content.splitlines()
    ]
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(40))
    for o in out:
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert o["response"]["body"]["object"] == "chat.completion"
        assert o["response"]["body"]["choices"][0]["message"]["content"]
    listed = [b.id async for b in oai.batches.list(limit=10)]
    assert batch.id in listed
    assert (await oai.files.retrieve(batch.output_file_id)).purpose == "batch_output"
    assert upload.id in [f.id async for f in oai.files.list()]
    assert (await oai.files.delete(upload.id)).deleted
    with pytest.raises(openai.NotFoundError):
        await oai.files.retrieve(upload.id)


async def test_bad_lines_go_to_the_error_file_and_the_rest_run(oai):
    lines = [chat_line(1), chat_line(1), chat_line(2, url="/v1/embeddings"), chat_line(3, method="GET")]
    lines += [
        {"custom_id": "req-4", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "sim/fast"}}
    ]
    lines += [chat_line(5), chat_line(6, model="no/such-model")]
    upload = await oai.files.create(file=("mixed.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = await oai.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = await finished(oai, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        7,
        2,
        5,
    )
    errors = [
        orjson.loads(line) for line in (await oai.files.content(batch.error_file_id)).content.splitlines()
    ]
    codes = sorted((e["error"] or {}).get("code") or e["response"]["body"]["error"]["code"] for e in errors)
    assert codes == [
        "duplicate_custom_id",
        "invalid_body",
        "invalid_method",
        "invalid_url",
        "model_not_found",
    ]
    out = [
        orjson.loads(line) for line in (await oai.files.content(batch.output_file_id)).content.splitlines()
    ]
    assert sorted(o["custom_id"] for o in out) == ["req-1", "req-5"]


async def test_files_that_are_not_batch_files_are_refused_with_the_reason(oai):
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.files.create(
            file=("x.jsonl", io.BytesIO(b'{"custom_id": "a"}\nnot json\n')), purpose="batch"
        )
    assert "line 2 is not a JSON object" in bad.value.message
    too_big = jsonl([chat_line(i, padding="x" * 1000) for i in range(1200)])  # over max_file_megabytes = 1
    with pytest.raises(openai.APIStatusError) as large:
        await oai.files.create(file=("big.jsonl", io.BytesIO(too_big)), purpose="batch")
    assert large.value.status_code == 413 and "1 MB" in large.value.message
    with pytest.raises(openai.BadRequestError):
        await oai.files.create(file=("x.jsonl", io.BytesIO(jsonl([chat_line(1)]))), purpose="fine-tune")
    upload = await oai.files.create(file=("ok.jsonl", io.BytesIO(jsonl([chat_line(1)]))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as wrong:
        await oai.batches.create(input_file_id=upload.id, endpoint="/v1/images", completion_window="24h")
    assert wrong.value.body["param"] == "endpoint"
    with pytest.raises(openai.NotFoundError):
        await oai.batches.create(
            input_file_id="file-nosuch", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        await oai.batches.retrieve(f"batch_{uuid.uuid4().hex}")


async def test_cancel_stops_dispatching_and_keeps_what_completed(oai):
    lines = [chat_line(i, model="sim/slow") for i in range(30)]
    upload = await oai.files.create(file=("slow.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = await oai.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def one_done():
        b = await oai.batches.retrieve(batch.id)
        return b.request_counts.completed >= 1

    await eventually(one_done, timeout=30, what="a first line to complete")
    cancelled = await oai.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    batch = await finished(oai, batch.id, timeout=15)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert 1 <= batch.request_counts.completed < 30
    out = (await oai.files.content(batch.output_file_id)).content.splitlines()
    assert len(out) == batch.request_counts.completed
    with pytest.raises(openai.ConflictError):
        await oai.batches.cancel((await finished(oai, (await _quick_batch(oai)).id)).id)


async def _quick_batch(oai):
    upload = await oai.files.create(file=("q.jsonl", io.BytesIO(jsonl([chat_line(1)]))), purpose="batch")
    return await oai.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


async def _first(stack: Stack, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "batch", *args, "--config", str(stack.config_path),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_first_batch_submit_status_and_results_from_a_terminal(batch_stack, oai, tmp_path):
    """The admin commands on the stack's own config: submit waits with a progress line, status
    lists the batch, results writes the output file whole."""
    (tmp_path / "in.jsonl").write_bytes(jsonl([chat_line(i, model="any") for i in range(25)]))
    code, out, err = await _first(
        batch_stack, "submit", str(tmp_path / "in.jsonl"), "--model", "sim/fast", "--wait"
    )
    assert code == 0, err
    batch_id = out.splitlines()[0]
    assert "completed" in out and "25/25" in out and "100%" in out, out
    code, out, err = await _first(batch_stack, "status")
    assert code == 0 and batch_id in out, err
    code, _, err = await _first(batch_stack, "results", batch_id, "-o", str(tmp_path / "out.jsonl"))
    assert code == 0, err
    lines = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert sorted(o["custom_id"] for o in lines) == sorted(f"req-{i}" for i in range(25))
    assert {o["response"]["body"]["model"] for o in lines} == {"sim/fast"}  # --model ran every line
    # The same batch through the HTTP API: it is the anonymous caller's.
    assert (await oai.batches.retrieve(batch_id)).status == "completed"
    code, _, err = await _first(batch_stack, "results", "batch_nosuch")
    assert code == 2 and "no batch batch_nosuch" in err


async def test_first_batch_route_runs_a_file_on_the_pinned_model_with_json_answers(batch_stack, oai):
    upload = await oai.files.create(
        file=("f.jsonl", io.BytesIO(jsonl([chat_line(i, model="whatever") for i in range(6)]))),
        purpose="batch",
    )
    base = batch_stack.base_url + "/resource_server"
    async with aiohttp.ClientSession() as http:
        body = {"input_file": upload.id, "model": "sim/fast", "output_folder_path": "/eagle/x"}
        async with http.post(f"{base}/polaris/sim/v1/batches", json=body) as r:
            assert r.status == 200, await r.text()
            submitted = await r.json()
        assert submitted["input_file"] == upload.id and submitted["output_folder_path"] == "/eagle/x"
        batch_id = submitted["batch_id"]
        async with http.post(f"{base}/polaris/sim/v1/batches", json={**body, "extra": 1}) as r:
            assert r.status == 400 and "extra" in (await r.json())["error"]["message"]
        async with http.post(f"{base}/nowhere/sim/v1/batches", json=body) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "cluster_not_found"

        async def finished_first():
            async with http.get(f"{base}/v1/batches/{batch_id}") as r:
                state = await r.json()
            return state if state["status"] == "completed" else None

        state = await eventually(finished_first, timeout=30, what="the FIRST batch to complete")
        assert state["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
        assert state["cluster"] == "polaris" and state["model"] == "sim/fast"
        async with http.get(f"{base}/v1/batches/{batch_id}/result") as r:
            assert r.status == 200 and (await r.json())["output_file_id"]
        async with http.get(f"{base}/v1/batches") as r:
            assert batch_id in [b["batch_id"] for b in (await r.json())["data"]]
    out = [
        orjson.loads(line) for line in (await oai.files.content(state["output_file_id"])).content.splitlines()
    ]
    assert {o["response"]["body"]["model"] for o in out} == {"sim/fast"}


async def test_interactive_requests_go_before_the_batch_lines_waiting_for_the_same_model(oai):
    """sim/slow serves one request at a time (about 0.8 s each): with a batch's lines queued for it,
    an interactive request waits for the line being served, not for the batch."""
    lines = [chat_line(i, model="sim/slow") for i in range(12)]
    upload = await oai.files.create(file=("prio.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = await oai.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def running():
        return (await oai.batches.retrieve(batch.id)).request_counts.completed >= 1

    await eventually(running, timeout=30, what="the batch to be running")
    started = asyncio.get_running_loop().time()
    answer = await oai.chat.completions.create(
        model="sim/slow", messages=[{"role": "user", "content": "now"}], max_tokens=2
    )
    took = asyncio.get_running_loop().time() - started
    assert answer.choices[0].message.content
    left = await oai.batches.retrieve(batch.id)
    assert left.request_counts.completed <= 4, "the batch ran ahead of the interactive request"
    assert took < 3.0, f"the interactive request waited {took:.1f} s behind the batch"
    await oai.batches.cancel(batch.id)


async def test_a_batch_resumes_where_it_was_when_first_up_restarts(tmp_path):
    """``first up`` stopped mid-batch and started again on the same store: the batch carries on
    and every line comes out once."""
    config = BATCH_STACK.format(store=tmp_path / "nats").replace(
        'engine = { kind = "sim", ttft_ms = 1, itl_ms = 1 }',
        'engine = { kind = "sim", ttft_ms = 1, itl_ms = 25, default_max_tokens = 5 }',
    )
    stack = Stack(config, tmp_path, name="restart")
    await stack.start(ready_models=["sim/fast"])
    client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=3, timeout=30)
    try:
        data = jsonl([{**chat_line(i), "body": {"model": "sim/fast", "messages": [{"role": "user", "content": "q"}]}}
                      for i in range(300)])  # fmt: skip
        upload = await client.files.create(file=("r.jsonl", io.BytesIO(data)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        async def some_done():
            b = await client.batches.retrieve(batch.id)
            return b if b.request_counts.completed >= 40 else None

        before = await eventually(some_done, timeout=30, what="40 lines done")
        assert before.status == "in_progress", "the batch ended before the restart: make it longer"
        assert await stack.stop() == 0, stack.log_tail()
        await stack.start(ready_models=["sim/fast"])
        batch = await finished(client, batch.id, timeout=60)
        assert batch.status == "completed" and batch.request_counts.completed == 300, batch
        out = [
            orjson.loads(line)
            for line in (await client.files.content(batch.output_file_id)).content.splitlines()
        ]
        assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(300))
    finally:
        await client.close()
        await stack.stop()
