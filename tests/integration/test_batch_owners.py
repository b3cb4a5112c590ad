"""Batch mode with identities: a gateway in this process whose callers are the test's table of
identities (the real auth middleware, a table in place of key or Globus checks), the batch
service, a router and a worker, all on the session's nats-server. Files and batches belong to
their caller: to anyone else they do not exist (404). The batch service's events come on the
event subjects, and lines run as their owner (the usage records name them)."""

from __future__ import annotations

import io

import aiohttp
import openai
import orjson
import pytest

from services.batch.service import BatchService
from services.gateway.app import create_app
from shared import batchstore, schema
from shared.batchstore import Batches
from shared.events import decode as decode_event
from tests.integration.conftest import make_config, table_auth
from tests.support import eventually

ALICE = schema.Identity(user="alice-id", kind="key", name="alice")
BOB = schema.Identity(user="bob-id", kind="key", name="bob")


def lines(n: int) -> bytes:
    return b"".join(
        orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                      "body": {"model": "m", "prompt": f"p{i}", "max_tokens": 3}}) + b"\n"
        for i in range(n)
    )  # fmt: skip


@pytest.fixture
async def stack(services, subjects):
    config = make_config(
        [{"id": "m", "capacity": 8}],
        nats={"subject_prefix": subjects.prefix},
        limits={"user": {"requests_per_s": 0, "model_tokens_per_min": 0}},
        batch={"progress_s": 0.1, "max_active_batches": 1},
    )
    await services.router(config)
    await services.worker(config, "m")
    app = create_app(config, services.nats_url)
    table_auth(app, {"alice": ALICE, "bob": BOB})
    url = await services.gateway(app)
    await services.stack.enter_async_context(BatchService(await services.connect(), subjects, config))
    clients = {
        who: openai.AsyncOpenAI(base_url=url + "/v1", api_key=who, max_retries=0, timeout=20)
        for who in ("alice", "bob")
    }
    clients["config"] = config
    yield clients
    for client in (clients["alice"], clients["bob"]):
        await client.close()


async def test_files_and_batches_belong_to_their_caller(stack, nc, subjects):
    alice, bob = stack["alice"], stack["bob"]
    events: list[schema.Event] = []
    usage: list[schema.UsageRecord] = []

    async def on_event(msg):
        events.append(decode_event(msg.data))

    async def on_usage(msg):
        usage.append(schema.usage_decoder.decode(msg.data))

    await nc.subscribe(subjects.events_of("batch"), cb=on_event)
    await nc.subscribe(subjects.usage, cb=on_usage)
    upload = await alice.files.create(file=("a.jsonl", io.BytesIO(lines(5))), purpose="batch")
    batch = await alice.batches.create(
        input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
    )

    with pytest.raises(openai.NotFoundError):
        await bob.files.retrieve(upload.id)
    with pytest.raises(openai.NotFoundError):
        await bob.files.content(upload.id)
    with pytest.raises(openai.NotFoundError):
        await bob.files.delete(upload.id)
    with pytest.raises(openai.NotFoundError):  # bob may not run alice's file either
        await bob.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        await bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await bob.batches.cancel(batch.id)
    assert [b.id async for b in bob.batches.list()] == []
    assert [f.id async for f in bob.files.list()] == []
    # One active batch per user here: alice's second waits for her first; bob's own goes ahead.
    with pytest.raises(openai.RateLimitError) as limited:
        await alice.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
        )
    assert "in progress" in limited.value.message

    async def done():
        b = await alice.batches.retrieve(batch.id)
        return b if b.status == "completed" else None

    batch = await eventually(done, timeout=20, what="alice's batch to complete")
    assert batch.request_counts.completed == 5
    with pytest.raises(openai.NotFoundError):
        await bob.files.content(batch.output_file_id)
    out = [orjson.loads(x) for x in (await alice.files.content(batch.output_file_id)).content.splitlines()]
    assert sorted(o["custom_id"] for o in out) == [f"r{i}" for i in range(5)]
    assert out[0]["response"]["body"]["object"] == "text_completion"

    names = await eventually(
        lambda: {e.name for e in events} >= {"created", "progress", "completed"} and {e.name for e in events},
        timeout=5, what="the batch's events",
    )  # fmt: skip
    assert names <= {"created", "progress", "completed"}
    assert {e.user for e in events} == {"alice-id"} and {e.source for e in events} == {"batch"}
    assert next(e for e in events if e.name == "completed").data["completed"] == 5
    ran = await eventually(lambda: len(usage) >= 5 and usage, timeout=5, what="the lines' usage records")
    assert {r.identity.user for r in ran} == {"alice-id"}  # the lines ran as alice


async def test_a_batch_past_its_completion_window_expires(stack, nc):
    """A batch whose window ended (here: written with one already past, as if the service had
    been down) is not run: it ends ``expired``, with its record's timestamps."""
    alice, config = stack["alice"], stack["config"]
    upload = await alice.files.create(file=("a.jsonl", io.BytesIO(lines(3))), purpose="batch")
    batches = await Batches.open(nc, config)
    record = schema.BatchRecord(
        id=batchstore.new_batch_id(), owner=ALICE.user, input_file_id=upload.id, endpoint="/v1/completions",
        completion_window="1h", created_at=batchstore.now() - 3601, expires_at=batchstore.now() - 1,
    )  # fmt: skip
    await batches.create(record)

    async def ended():
        b = await alice.batches.retrieve(record.id)
        return b if b.status in ("expired", "completed", "failed") else None

    batch = await eventually(ended, timeout=10, what="the batch to expire")
    assert batch.status == "expired" and batch.expired_at
    assert batch.request_counts.completed == 0


async def test_malformed_uploads_limits_and_windows_are_400_not_500(stack):
    """What the fuzz test once found answering 500: control bytes in an upload part's headers, and
    numbers that str.isdigit takes but int() refuses (a superscript digit, over 4300 digits)."""
    url, auth = str(stack["alice"].base_url), {"Authorization": "Bearer alice"}
    part = b'--b\r\nContent-Disposition: form-data; name="\x11"\r\n\r\nx\r\n--b--\r\n'
    async with aiohttp.ClientSession(headers=auth) as http:
        multipart = {"Content-Type": "multipart/form-data; boundary=b"}
        async with http.post(url + "files", data=part, headers=multipart) as r:
            assert r.status == 400, await r.text()
            assert "multipart body could not be read" in (await r.json())["error"]["message"]
        for path in ("files?limit=\u00b2", "batches?limit=\u00b2", "batches?limit=" + "1" * 5000):
            async with http.get(url + path) as r:
                assert (r.status, (await r.json())["error"]["param"]) == (400, "limit"), path[:20]
        for window in ("\u00b2h", "1" * 5000 + "h"):
            batch = {"input_file_id": "file-x", "endpoint": "/v1/completions", "completion_window": window}
            async with http.post(url + "batches", json=batch) as r:
                assert (r.status, (await r.json())["error"]["param"]) == (400, "completion_window")


async def test_without_jetstream_the_gateway_serves_and_batch_routes_answer_503_until_it_comes(
    services, subjects
):
    """A NATS server without JetStream: the gateway still starts and answers /v1/models; the Files
    and Batches routes say 503 with Retry-After (not a hang, not a 500) and why."""
    import asyncio

    import aiohttp

    from services.gateway.app import create_app
    from shared.natsserver import find_binary
    from tests.integration.conftest import make_config
    from tests.support import free_port

    port = free_port()
    server = await asyncio.create_subprocess_exec(
        find_binary(), "-a", "127.0.0.1", "-p", str(port), stderr=asyncio.subprocess.PIPE
    )  # no -js
    try:
        while b"Server is ready" not in await asyncio.wait_for(server.stderr.readline(), 10):
            pass
        config = make_config([{"id": "m"}], nats={"subject_prefix": subjects.prefix})
        url = await services.gateway(create_app(config, f"nats://127.0.0.1:{port}"))
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/v1/models") as r:
                assert r.status == 200
            for method, path in (
                ("GET", "/v1/files"),
                ("GET", "/v1/batches"),
                ("GET", "/v1/batches/batch_x"),
            ):
                async with http.request(method, url + path) as r:
                    body = await r.json()
                    assert r.status == 503, (path, body)
                    assert body["error"]["code"] == "service_unavailable", body
                    assert body["error"]["message"].startswith("batch mode is not available: "), body
                    assert "JetStream is not enabled on this NATS server" in body["error"]["message"]
                    assert r.headers["Retry-After"] == "5"
    finally:
        server.terminate()
        await server.wait()
