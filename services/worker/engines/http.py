"""HTTP/1.1 to the engine beside the worker: kept-alive connections, parsed by httptools.

Every request a worker serves is one HTTP exchange with its engine (vLLM, llama.cpp server, any
OpenAI-compatible server) on the same node. aiohttp's client cost more per exchange than all the
rest of the worker (about 0.15 ms, and a quarter of its CPU while streaming); this keeps only what
the worker needs: a request with a body, the status, a few headers, and the body as it arrives
(Content-Length, chunked, or until the server closes), parsed by httptools (llhttp, the parser of
Node.js and uvicorn). One exchange at a time per connection; idle connections wait in a pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

MAX_HEAD_BYTES = 64 * 1024
PAUSE_ABOVE = 4 << 20  # stop reading from a server that sends faster than the worker takes
MAX_IDLE = 256


class EngineHTTPError(Exception):
    """The exchange failed: no connection, a broken or malformed answer."""


class EngineHTTPTimeout(EngineHTTPError):
    """The engine was silent for longer than the read timeout."""


class Response:
    """The engine's answer: ``status``, ``headers`` (lower-case names), and the body, read whole
    (``read``) or as it arrives (``blocks``)."""

    def __init__(self, conn: _Connection):
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers

    async def read(self) -> bytes:
        return b"".join([block async for block in self.blocks()])

    async def blocks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.body:
                block = b"".join(conn.body)
                conn.body.clear()
                conn.buffered = 0
                if conn.paused:
                    conn.paused = False
                    conn.transport.resume_reading()
                yield block
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise EngineHTTPError(conn.error)
            await conn.wait(conn.read_timeout_s)


class _Connection(asyncio.Protocol):
    def __init__(self, read_timeout_s: float):
        self.read_timeout_s = read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self._waiter: asyncio.Future | None = None
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_bytes = 0
        self.head_done = False
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.complete = False
        self.keep_alive = False
        self.started = False  # a byte of the answer came
        self.error: str | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"malformed answer from the engine: {exc}")
            self.transport.close()
            return
        if self.buffered > PAUSE_ABOVE and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and not self.complete and "content-length" not in self.headers:
            if self.headers.get("transfer-encoding", "").lower() != "chunked":
                self.complete = True  # the body ran until the server closed
        if not self.complete:
            self._fail("the engine closed the connection mid-answer" if self.started else "connection lost")
        self._wake()

    # --- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserCallbackError("answer head too large")
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # only valid now, not once parsing moved on

    # --- the exchange --------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.reset()
        self.transport.write(data)

    async def wait(self, timeout_s: float) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self._waiter
        except TimeoutError:
            raise EngineHTTPTimeout(f"the engine sent nothing for {timeout_s:g} s") from None
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class EngineClient:
    """Requests to one engine (``http://host:port``); ``async with client.request(...) as r``."""

    def __init__(self, base_url: str, *, connect_timeout_s: float = 10.0, read_timeout_s: float = 600.0):
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"engine URL {base_url!r}: only http://host[:port] is supported")
        self.host, self.port = url.hostname, url.port or 80
        self.prefix = url.path.rstrip("/")
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self._host_header = f"{self.host}:{self.port}".encode()
        self._idle: list[_Connection] = []

    @contextlib.asynccontextmanager
    async def request(
        self, method: str, path: str, body: bytes = b"", *, accept: str = "application/json"
    ) -> AsyncIterator[Response]:
        head = (
            f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: ".encode()
            + self._host_header
            + f"\r\nAccept: {accept}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        conn = await self._exchange(head + body)
        try:
            yield Response(conn)
        except BaseException:
            conn.close()  # an answer not read to its end cannot be followed by another
            raise
        if conn.complete and conn.keep_alive and not conn.closed and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()

    async def get(self, path: str, *, timeout_s: float) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout_s), self.request("GET", path) as resp:
            return resp.status, await resp.read()

    async def _exchange(self, data: bytes) -> _Connection:
        """Send; return the connection once the answer's head is in."""
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            conn.send(data)
            try:
                return await self._head(conn)
            except EngineHTTPTimeout:
                raise
            except EngineHTTPError:
                if conn.started:
                    raise
            # The server closed this idle connection as we reused it: it never read the request.
        conn = await self._connect()
        conn.send(data)
        return await self._head(conn)

    async def _head(self, conn: _Connection) -> _Connection:
        while not conn.head_done:
            if conn.error is not None:
                raise EngineHTTPError(conn.error)
            await conn.wait(self.read_timeout_s)
        return conn

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.read_timeout_s), self.host, self.port
                )
        except (OSError, TimeoutError) as exc:
            raise EngineHTTPError(f"cannot connect to the engine at {self.host}:{self.port}: {exc}") from None
        return conn

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
