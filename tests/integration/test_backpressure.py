"""Big answers and slow readers: no message over NATS's max_payload, no gateway memory without bound.

The engine is tests/mock_engine.py behind the `openai` engine kind; router, worker and gateway run
in this process against the session's nats-server.
"""

from __future__ import annotations

import asyncio

import orjson

from services.gateway.app import create_app, start_site
from shared import schema
from tests.integration.conftest import make_config, openai_engine
from tests.mock_engine import start as start_mock_engine
from tests.support import eventually


async def mock_worker(services, subjects, mock, **sections):
    engine = openai_engine(mock.url)
    config = make_config(
        [{"id": "m", "engine": engine}], nats={"subject_prefix": subjects.prefix}, **sections
    )
    await services.router(config)
    await services.worker(config, "m")
    return config


async def test_an_answer_larger_than_a_nats_message_arrives_whole_in_several(services, nc, subjects):
    """Once, a fast engine's tokens packed into one message passed max_payload: engine_error."""
    async with await start_mock_engine() as mock:
        await mock_worker(services, subjects, mock)
        client = await services.client()
        sizes: list[int] = []

        async def on_reply(msg):
            sizes.append(len(msg.data))

        await nc.subscribe(subjects.reply_stream_all(client.client_id), cb=on_reply)
        tokens = 400_000  # " tok" each: 1.6 MB of text, in one answer
        body = orjson.dumps({"model": "m", "prompt": "x", "max_tokens": tokens})
        result = await asyncio.wait_for(client.complete("m", "completion", body), 30)
        assert len(result.texts[0]) == 4 * tokens and result.usage.completion_tokens == tokens
        await eventually(lambda: sum(sizes) > 4 * tokens, what="our copy of every message")
        assert len(sizes) >= 3 and max(sizes) <= nc.max_payload


async def test_a_client_that_reads_too_slowly_is_cut_off_and_its_request_stopped(services, nc, subjects):
    """A slow reader of a fast stream once made the gateway hold the whole answer in memory."""
    async with await start_mock_engine() as mock:
        # Router, worker and gateway share this process's loop with a flat-out stream: a dispatch
        # reply may come late under load, and a second run of the request is not what this tests.
        config = await mock_worker(
            services,
            subjects,
            mock,
            gateway={"max_buffered_bytes": 256 * 1024},
            router={"dispatch_timeout_s": 30},
        )
        usage: list[schema.UsageRecord] = []

        async def on_usage(msg):
            usage.append(schema.usage_decoder.decode(msg.data))

        await nc.subscribe(subjects.usage, cb=on_usage)
        runner = await start_site(create_app(config, services.nats_url), "127.0.0.1", 0)
        writer = None
        try:
            port = runner.addresses[0][1]
            tokens = 2_000_000  # 8 MB of text, streamed as fast as the engine can
            payload = {"model": "m", "prompt": "x", "max_tokens": tokens, "stream": True, "mock_itl_ms": 0}
            body = orjson.dumps(payload)
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            # Read nothing for a while: the socket fills, the gateway stops writing, the answer piles up.
            await eventually(lambda: usage, timeout=20, what="the run to end")
            rest = await asyncio.wait_for(reader.read(), 20)  # what the gateway had written, then the end
            assert b'"code":"engine_error"' in rest and rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
            assert [r.outcome for r in usage] == ["cancelled"] and usage[0].completion_tokens < tokens
        finally:
            if writer is not None:
                writer.close()  # else the cleanup below waits on a handler writing to no reader
            await runner.cleanup()
