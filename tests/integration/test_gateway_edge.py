"""The gateway's HTTP edge against hostile clients: the gateway in this process, raw sockets in front.

No router runs: every request here is refused, or answered, by the gateway alone.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import pytest
from structlog.testing import capture_logs

from services.gateway import openapi
from services.gateway.app import create_app, start_site
from tests.integration.conftest import make_config
from tests.support import eventually


@pytest.fixture
async def gateway(nats_url, subjects):
    """``await gateway(**gateway_fields)`` serves a gateway on a free port and returns the port."""
    runners = []

    async def start(**fields) -> int:
        config = make_config([], nats={"subject_prefix": subjects.prefix}, gateway=fields)
        runner = await start_site(create_app(config, nats_url), "127.0.0.1", 0)
        runners.append(runner)
        return runner.addresses[0][1]

    yield start
    for runner in runners:
        await runner.cleanup()


def post(path: str, body: bytes, content_type: str | None = "application/json") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + body


def get(path: str, *, close: bool = True) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{'Connection: close' if close else ''}\r\n\r\n".encode()


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def envelope(body: bytes) -> dict:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def exchange(port: int, *parts: bytes, pause: float = 0.0, timeout: float = 5.0):
    """Send ``parts`` (``pause`` seconds apart) and read until the gateway closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        return parse(await asyncio.wait_for(reader.read(), timeout))
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response on a kept-alive connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, headers, _ = parse(head)
    return status, headers, await reader.readexactly(int(headers["content-length"]))


# --- bodies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "application/json; charset=latin-1",
    ],
)
async def test_only_json_bodies_are_taken(gateway, content_type):
    """What a browser page may send cross-origin without a preflight is refused with 415."""
    port = await gateway()
    status, headers, body = await exchange(
        port, post("/v1/chat/completions", b'{"model": "m"}', content_type)
    )
    assert status == 415 and headers["content-type"].startswith("application/json")
    assert envelope(body)["code"] == "unsupported_media_type"


async def test_json_with_a_utf8_charset_passes_the_media_type_check(gateway):
    port = await gateway()
    raw = post("/v1/completions", b'{"model": "m"}', "Application/JSON; charset=UTF-8")
    status, _, body = await exchange(port, raw)
    assert status == 400 and envelope(body)["param"] == "prompt"


async def test_a_body_that_trickles_gets_408(gateway):
    port = await gateway(body_timeout_s=0.3)
    head = post("/v1/chat/completions", b"x" * 100)
    started = time.monotonic()
    status, _, body = await exchange(port, head[:-90])  # the head and 10 of the 100 bytes
    assert status == 408 and envelope(body)["code"] == "request_timeout"
    assert time.monotonic() - started < 3


async def test_a_broken_chunk_after_the_head_is_400_at_once(gateway):
    """aiohttp alone leaves the handler waiting for that body forever."""
    port = await gateway(body_timeout_s=30)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    status, _, body = await exchange(port, head, b"zz\r\nabc\r\n0\r\n\r\n", pause=0.1)
    error = envelope(body)
    assert status == 400 and error["code"] == "invalid_request" and "chunk" in error["message"]


# --- what aiohttp's parser refuses ------------------------------------------------------------------------

MANY_HEADERS = "".join(f"X-{i}: y\r\n" for i in range(200)).encode()


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
        (b"GET /health HTTP/1.1\r\nHost: t\r\n" + MANY_HEADERS + b"\r\n", 431, "headers_too_large"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 431, "headers_too_large"),
        (b"GARBAGE\r\n\r\n", 400, "invalid_request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "invalid_request"),  # TLS on plain HTTP
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            400,
            "invalid_request",
        ),
    ],
    ids=["long-header", "many-headers", "long-url", "bad-request-line", "tls", "bad-chunk"],
)
async def test_aiohttp_refusals_are_openai_errors_logged_once(gateway, caplog, raw, status, code):
    port = await gateway()
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    with capture_logs() as logs:
        got, headers, body = await exchange(port, raw)
    assert got == status and headers["content-type"].startswith("application/json")
    assert envelope(body)["code"] == code and headers["x-request-id"]
    assert [e["event"] for e in logs] == ["http_refused"]
    assert logs[0]["status"] == status and logs[0]["request_id"] == headers["x-request-id"]
    assert not [r for r in caplog.records if r.name.startswith("aiohttp") and r.exc_info], "a traceback"


# --- slow and idle connections -----------------------------------------------------------------------------


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), seconds) == b""
    return time.monotonic() - started


async def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(gateway):
    port = await gateway(header_timeout_s=0.3, keepalive_timeout_s=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    with capture_logs() as logs:
        assert await _closed_within(reader, 5) < 2
    writer.close()
    assert [e["event"] for e in logs] == ["http_header_timeout"]


async def test_a_head_that_trickles_in_is_cut_off(gateway):
    """Slowloris: a byte at a time, never a whole head."""
    port = await gateway(header_timeout_s=0.3, keepalive_timeout_s=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def trickle():
        for byte in b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 500:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)

    dripping = asyncio.create_task(trickle())
    try:
        assert await _closed_within(reader, 5) < 2
    finally:
        dripping.cancel()
        writer.close()


async def test_kept_alive_connections_idle_until_keepalive_timeout(gateway):
    """Between requests the head deadline does not run; the keep-alive timeout does."""
    port = await gateway(header_timeout_s=0.3, keepalive_timeout_s=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/health", close=False))
    assert (await read_response(reader))[0] == 200
    await asyncio.sleep(0.6)  # past the head deadline, within keep-alive
    writer.write(get("/health", close=False))
    assert (await read_response(reader))[0] == 200
    assert 0.5 < await _closed_within(reader, 5) < 3
    writer.close()


async def test_connections_over_the_limit_get_503_then_a_freed_slot_serves(gateway):
    port = await gateway(max_connections=2)
    held = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/health", close=False))
        assert (await read_response(reader))[0] == 200  # accepted and counted
        held.append(writer)
    status, headers, body = await exchange(port, get("/health"))
    assert status == 503 and headers["retry-after"] == "1"
    assert envelope(body)["code"] == "no_capacity"
    held.pop().close()

    async def served() -> bool:
        return (await exchange(port, get("/health")))[0] == 200

    await eventually(served, what="a freed connection slot")
    for writer in held:
        writer.close()


# --- logs and the document ---------------------------------------------------------------------------------


async def test_the_logged_path_is_clipped(gateway):
    port = await gateway()
    with capture_logs() as logs:
        status, _, _ = await exchange(port, get("/" + "a" * 5000))
    assert status == 404
    (line,) = [e for e in logs if e["event"] == "http_request"]
    assert len(line["path"]) < 160 and line["path"].endswith("[5001 chars]")


async def test_the_openapi_document_is_served(gateway):
    port = await gateway()
    status, headers, body = await exchange(port, get("/openapi.json"))
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert orjson.loads(body) == orjson.loads(orjson.dumps(openapi.build()))


async def test_the_logged_model_is_clipped(gateway):
    port = await gateway()
    body = orjson.dumps({"model": "m" * 200, "prompt": "hi"})
    with capture_logs() as logs:
        status, _, _ = await exchange(port, post("/v1/completions", body), timeout=10)
    assert status == 503  # no router here
    (line,) = [e for e in logs if e["event"] == "http_request"]
    assert line["model"] == "m" * 128 + "...[200 chars]"
