"""The worker's HTTP client to its engine, against real servers: the mock engine (raw asyncio),
aiohttp (chunked and Connection: close answers), and raw sockets that misbehave."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiohttp import web

from services.worker.engines.http import EngineClient, EngineHTTPError, EngineHTTPTimeout
from tests.mock_engine import start as start_mock_engine
from tests.support import free_port

BODY = orjson.dumps({"model": "mock", "prompt": "hi", "max_tokens": 4})


async def read_all(
    client: EngineClient, body: bytes = BODY, path: str = "/v1/completions"
) -> tuple[int, bytes]:
    async with client.request("POST", path, body) as resp:
        return resp.status, await resp.read()


async def test_whole_and_streamed_answers_reuse_one_kept_alive_connection():
    async with await start_mock_engine() as mock:
        client = EngineClient(mock.url)
        for _ in range(5):
            status, raw = await read_all(client)
            assert status == 200 and orjson.loads(raw)["usage"]["completion_tokens"] == 4
        stream = orjson.dumps({"model": "mock", "prompt": "hi", "max_tokens": 3, "stream": True})
        async with client.request("POST", "/v1/completions", stream, accept="text/event-stream") as resp:
            text = b"".join([block async for block in resp.blocks()])
        assert text.count(b"data: {") == 3 and text.rstrip().endswith(b"data: [DONE]")
        assert mock.connections == 1, "every exchange went over the same connection"
        await client.close()


async def test_concurrent_requests_open_connections_and_keep_them():
    async with await start_mock_engine() as mock:
        client = EngineClient(mock.url)
        for _ in range(2):
            results = await asyncio.gather(*(read_all(client) for _ in range(8)))
            assert all(status == 200 for status, _ in results)
        assert mock.connections <= 8
        await client.close()


@pytest.fixture
async def aiohttp_engine():
    """Chunked answers, and answers that close their connection, as aiohttp servers write them."""

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"one ", b"two ", b"three"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def closing(_request: web.Request) -> web.Response:
        return web.Response(body=b"bye", headers={"Connection": "close"})

    async def big(_request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (6 << 20))

    app = web.Application()
    app.router.add_post("/chunked", chunked)
    app.router.add_post("/closing", closing)
    app.router.add_post("/big", big)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_chunked_closing_and_large_answers_read_whole(aiohttp_engine):
    client = EngineClient(aiohttp_engine)
    assert await read_all(client, path="/chunked") == (200, b"one two three")
    assert await read_all(client, path="/closing") == (200, b"bye")
    assert await read_all(client, path="/chunked") == (200, b"one two three"), "after a closed one, a new one"
    status, raw = await read_all(client, path="/big")
    assert status == 200 and len(raw) == 6 << 20
    await client.close()


async def raw_server(handle) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)


async def test_a_kept_alive_connection_the_engine_closed_meanwhile_is_replaced_without_failing():
    """uvicorn (vLLM, llama.cpp server) closes idle connections after 5 s; a request may already be
    on its way on one as it does. That request never reached the engine: it is sent again, once,
    on a new connection."""
    served = 0

    async def close_on_second_request(reader, writer):
        nonlocal served
        await read_request(reader)
        served += 1
        writer.write(OK)
        await writer.drain()
        await reader.read(1)  # the next request has begun to arrive: close as if idle-timed-out
        writer.transport.abort()

    server, url = await raw_server(close_on_second_request)
    client = EngineClient(url)
    assert await read_all(client) == (200, b"ok")
    assert await read_all(client) == (200, b"ok")
    assert served == 2
    server.close()
    await client.close()


async def test_an_engine_that_goes_silent_is_a_timeout_and_garbage_is_an_error():
    async def silent(reader, _writer):
        await read_request(reader)
        await asyncio.sleep(30)

    async def garbage(reader, writer):
        await read_request(reader)
        writer.write(b"SMTP is not HTTP\r\n\r\n")
        await writer.drain()

    server, url = await raw_server(silent)
    client = EngineClient(url, read_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(EngineHTTPTimeout, match=r"sent nothing for 0\.3 s"):
        await read_all(client)
    assert time.monotonic() - started < 2
    server.close()

    server, url = await raw_server(garbage)
    with pytest.raises(EngineHTTPError, match="malformed"):
        await read_all(EngineClient(url))
    server.close()


async def test_an_engine_that_is_not_there_is_an_error_at_once():
    client = EngineClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(EngineHTTPError, match="cannot connect"):
        await read_all(client)
    with pytest.raises(ValueError, match="only http"):
        EngineClient("https://engine.example.org")
