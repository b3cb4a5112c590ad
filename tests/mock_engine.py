"""A zero-delay OpenAI-compatible engine server: the baseline of the benchmarks, a target for fault injection.

It answers like vLLM (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``,
Prometheus ``/metrics``) and costs as little as Python allows: raw asyncio protocol, HTTP/1.1
keep-alive, each zero-delay answer built and written in one piece from inside ``data_received``.
It imports nothing from ``services`` or ``shared``, so it measures and tests them from outside.

Every answer has ``max_completion_tokens`` or ``max_tokens`` or 16 tokens, each `` tok``, and
finish_reason ``length``. Extra body fields inject faults (the stack forwards them untouched):
``mock_status`` (answer that HTTP status with an error body; 429 carries ``Retry-After: 3``),
``mock_ttft_ms`` (delay before the first token or the answer), ``mock_itl_ms`` (delay between
streamed tokens), ``mock_hang`` (take the request and never answer).

Run ``python -m tests.mock_engine --port N [--model NAME ...] [--metrics garbage]``, or in a test::

    engine = await mock_engine.start(models=("mock",))   # engine.url
    ...
    await engine.stop()
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import orjson

from tests.mock_http import HttpError, Request, parse_request, response

DEFAULT_TOKENS = 16
TOKEN = " tok"
_EVENT_STREAM = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 422: "UnprocessableEntityError", 429: "RateLimitError"}  # fmt: skip
_GARBAGE_METRICS = b"""# HELP vllm:num_requests_running garbage on purpose
vllm:num_requests_running{model_name="mock"} NaN
vllm:num_requests_waiting NaN
vllm:kv_cache_usage_perc{model_name="mock"} NaN
vllm:kv_cache_usage_perc{model_name="other"} +Inf
this line is not a metric
vllm:num_requests_waiting{model_name="mock" 3
vllm:num_requests_running{model_name="mock"} twelve
\x00\xff{}{}
"""


def error_body(status: int, message: str) -> bytes:
    """vLLM's error body (flat, with an ``object`` field: what its OpenAI server answers)."""
    kind = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return orjson.dumps({"object": "error", "message": message, "type": kind, "param": None, "code": status})


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict) -> bytes:
    return _chunk(b"data: " + orjson.dumps(payload) + b"\n\n")


_DONE = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class _BadBody(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _words(value: Any) -> int:
    """A prompt's token count for usage: its words (content parts and messages included)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return _words(value.get("content")) + _words(value.get("text"))
    return 0


def _number(body: dict, name: str, default: float = 0.0) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _BadBody(400, f"{name} must be a number >= 0")
    return value


class _Generation:
    """One completion request, checked; ``events()`` or ``whole()`` is its answer."""

    def __init__(self, engine: MockEngine, chat: bool, body: dict):
        self.chat = chat
        model = body.get("model", engine.models[0])
        if not isinstance(model, str):
            raise _BadBody(400, "model must be a string")
        self.model = model
        self.fault = body.get("mock_status")
        if self.fault is not None and (isinstance(self.fault, bool) or self.fault not in range(200, 600)):
            raise _BadBody(400, "mock_status must be an HTTP status (200-599)")
        self.ttft_s = _number(body, "mock_ttft_ms") / 1000
        self.itl_s = _number(body, "mock_itl_ms") / 1000
        self.hang = bool(body.get("mock_hang"))
        stream = body.get("stream", False)
        if not isinstance(stream, bool | None):
            raise _BadBody(400, "stream must be a boolean")
        self.stream = bool(stream)
        options = body.get("stream_options") or {}
        self.usage_chunk = isinstance(options, dict) and bool(options.get("include_usage"))
        prompt = body.get("messages") if chat else body.get("prompt")
        if chat and (not isinstance(prompt, list) or not prompt):
            raise _BadBody(400, "messages must be a non-empty list")
        if not chat and not isinstance(prompt, str | list):
            raise _BadBody(400, "prompt must be a string or a list")
        self.prompt_tokens = _words(prompt)
        tokens = body.get("max_completion_tokens")
        tokens = body.get("max_tokens") if tokens is None else tokens
        tokens = DEFAULT_TOKENS if tokens is None else tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise _BadBody(400, "max_tokens must be an integer >= 1")
        self.tokens = tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + engine.next_id()
        self.created = int(time.time())

    def _base(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, text: str, finish: str | None, role: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": text} if role else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _usage(self) -> dict:
        p, c = self.prompt_tokens, self.tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def events(self) -> list[bytes]:
        """The stream's chunks, each an SSE event: [role delta], tokens, [usage], [DONE] and the last chunk."""
        base = self._base()
        token = _event(dict(base, choices=[self._choice(TOKEN, None)]))
        last = _event(dict(base, choices=[self._choice(TOKEN, "length")]))
        out = [_event(dict(base, choices=[self._choice("", None, role=True)]))] if self.chat else []
        out += [token] * (self.tokens - 1) + [last]
        if self.usage_chunk:
            out.append(_event(dict(base, choices=[], usage=self._usage())))
        out.append(_DONE)
        return out

    def whole(self) -> bytes:
        text = TOKEN * self.tokens
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "length"}  # fmt: skip
            base = dict(self._base(), object="chat.completion")
        else:
            choice = self._choice(text, "length")
            base = self._base()
        return orjson.dumps(dict(base, choices=[choice], usage=self._usage()))


class _Connection(asyncio.Protocol):
    """One client connection: requests in order, zero-delay ones answered inside data_received."""

    def __init__(self, engine: MockEngine):
        self.engine = engine
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None  # a delayed answer; later requests wait for it

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.engine.connections += 1
        self.engine.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine.open.discard(self)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.task is None:
            self._serve()
        elif len(self.buf) > 1 << 20:
            self.transport.pause_reading()  # pipelined requests behind a slow answer: hold the client

    def _serve(self) -> None:
        while self.task is None and not self.transport.is_closing():
            try:
                request = parse_request(self.buf)
            except HttpError as exc:
                self.transport.write(response(exc.status, error_body(exc.status, exc.message), close=True))
                self.transport.close()
                return
            if request is None:
                return
            answer = self.engine.handle(request)
            if isinstance(answer, bytes):
                self.transport.write(answer)
                if not request.keep_alive:
                    self.transport.close()
            else:
                self.task = asyncio.get_running_loop().create_task(self._delayed(answer, request))

    async def _delayed(self, generation: _Generation, request: Request) -> None:
        engine = self.engine
        engine.running += 1
        try:
            await engine.answer_slowly(self.transport, generation, request.keep_alive)
        finally:
            engine.running -= 1
            self.task = None
        if not self.transport.is_closing():
            self.transport.resume_reading()
            self._serve()


class MockEngine:
    """The server; ``start()`` returns it with ``url`` set, ``stop()`` closes every connection."""

    def __init__(
        self,
        models: Sequence[str] = ("mock",),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics: str = "normal",
    ):
        if not models or metrics not in ("normal", "garbage"):
            raise ValueError("needs at least one model, and metrics 'normal' or 'garbage'")
        self.models = tuple(models)
        self.host, self.port, self.metrics = host, port, metrics
        self.url = ""
        self.requests = 0  # generation requests received (checked or not)
        self.connections = 0  # accepted since start
        self.running = 0  # answers in progress (delayed or hanging)
        self.received: deque[dict] = deque(maxlen=100)  # the latest bodies, for tests
        self.open: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._ids = 0
        self._id_prefix = os.urandom(4).hex()
        self._routes = {
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/completions": ("POST", self._completion),
            "/v1/models": ("GET", self._list_models),
            "/v1/embeddings": ("POST", self._embeddings),
            "/health": ("GET", lambda _r: response(200, b"")),
            "/metrics": ("GET", self._metrics),
        }

    async def start(self) -> MockEngine:
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
            self.url = f"http://{self.host}:{self.port}"
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self.open):
            conn.transport.abort()  # hanging answers included: nothing waits for them
        await server.wait_closed()
        await asyncio.sleep(0)  # let cancelled delayed answers unwind

    async def __aenter__(self) -> MockEngine:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def next_id(self) -> str:
        self._ids += 1
        return f"{self._id_prefix}{self._ids:08x}"

    def handle(self, request: Request) -> bytes | _Generation:
        """The whole answer, or a generation to answer with delays (``answer_slowly``)."""
        route = self._routes.get(request.path)
        if route is None:
            return response(
                404, error_body(404, f"no such path: {request.path}"), close=not request.keep_alive
            )
        method, handler = route
        if request.method != method:
            body = error_body(405, f"{request.method} is not allowed on {request.path}")
            return response(405, body, [("Allow", method)], close=not request.keep_alive)
        answer = handler(request)
        if isinstance(answer, _Generation) and not (answer.hang or answer.ttft_s or answer.itl_s):
            return self._answer_now(answer, request.keep_alive)
        return answer

    def _chat(self, request: Request) -> bytes | _Generation:
        return self._generation(request, chat=True)

    def _completion(self, request: Request) -> bytes | _Generation:
        return self._generation(request, chat=False)

    def _embeddings(self, request: Request) -> bytes:
        """vLLM's answer: a vector per input, ``[words, 1, 0, 0]``; with ``"mock_per_token": true``
        llama.cpp's server without pooling: one vector per word, ``[position, 1, 0, 0]``."""
        close = not request.keep_alive
        body = orjson.loads(request.body)
        self.received.append(body)
        if body.get("model") not in self.models:
            return response(
                404, error_body(404, f"The model `{body.get('model')}` does not exist."), close=close
            )
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data, tokens = [], 0
        for i, text in enumerate(inputs):
            words = _words(text)
            tokens += words
            if body.get("mock_per_token"):
                vector = [[float(p), 1.0, 0.0, 0.0] for p in range(words)]
            else:
                vector = [float(words), 1.0, 0.0, 0.0]
            data.append({"object": "embedding", "index": i, "embedding": vector})
        answer = {"object": "list", "data": data, "model": body["model"],
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip
        return response(200, orjson.dumps(answer), close=close)

    def _generation(self, request: Request, chat: bool) -> bytes | _Generation:
        self.requests += 1
        close = not request.keep_alive
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            return response(400, error_body(400, f"the body is not JSON: {exc}"), close=close)
        if not isinstance(body, dict):
            return response(400, error_body(400, "the body must be a JSON object"), close=close)
        self.received.append(body)
        try:
            generation = _Generation(self, chat, body)
        except _BadBody as exc:
            return response(exc.status, error_body(exc.status, exc.message), close=close)
        if generation.model not in self.models:
            body = error_body(404, f"The model `{generation.model}` does not exist.")
            return response(404, body, close=close)
        return generation

    def _fault(self, generation: _Generation, keep_alive: bool) -> bytes | None:
        status = generation.fault
        if status is None or status == 200:
            return None
        try:
            message = f"mock_status {status}: {HTTPStatus(status).phrase}"
        except ValueError:
            message = f"mock_status {status}"
        headers = [("Retry-After", "3")] if status == 429 else []
        return response(status, error_body(status, message), headers, close=not keep_alive)

    def _answer_now(self, generation: _Generation, keep_alive: bool) -> bytes:
        if (fault := self._fault(generation, keep_alive)) is not None:
            return fault
        if not generation.stream:
            return response(200, generation.whole(), close=not keep_alive)
        head = response(200, None, _EVENT_STREAM, close=not keep_alive)
        return head + b"".join(generation.events())

    async def answer_slowly(self, transport: asyncio.Transport, generation: _Generation, keep_alive: bool):
        if generation.hang:
            await asyncio.Future()  # never answers; the connection's end cancels this
        if generation.stream and generation.fault in (None, 200):
            transport.write(response(200, None, _EVENT_STREAM, close=not keep_alive))
            await asyncio.sleep(generation.ttft_s)
            events = generation.events()
            first = 2 if generation.chat else 1  # a chat's role delta goes with its first token
            if transport.is_closing():
                return
            transport.write(b"".join(events[:first]))
            for event in events[first : first + generation.tokens - 1]:
                await asyncio.sleep(generation.itl_s)
                if transport.is_closing():
                    return
                transport.write(event)
            transport.write(b"".join(events[first + generation.tokens - 1 :]))  # usage, [DONE]
        else:
            await asyncio.sleep(generation.ttft_s)
            if not transport.is_closing():
                transport.write(self._answer_now(generation, keep_alive))
        if not keep_alive:
            transport.close()

    def _list_models(self, request: Request) -> bytes:
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "mock", "root": m,
                 "parent": None, "max_model_len": 4096} for m in self.models]  # fmt: skip
        return response(200, orjson.dumps({"object": "list", "data": data}), close=not request.keep_alive)

    def _metrics(self, request: Request) -> bytes:
        if self.metrics == "garbage":
            text = _GARBAGE_METRICS
        else:
            label = f'{{model_name="{self.models[0]}"}}'
            text = (
                "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                "# TYPE vllm:num_requests_running gauge\n"
                f"vllm:num_requests_running{label} {float(self.running)}\n"
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
                "# TYPE vllm:num_requests_waiting gauge\n"
                f"vllm:num_requests_waiting{label} 0.0\n"
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                f"vllm:kv_cache_usage_perc{label} {min(1.0, self.running / 256)}\n"
            ).encode()
        headers = [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")]
        return response(200, text, headers, close=not request.keep_alive)


async def start(models: Sequence[str] = ("mock",), **kw) -> MockEngine:
    """A started engine (``.url``, ``await .stop()``); keywords as for ``MockEngine``."""
    return await MockEngine(models, **kw).start()


async def _main(args: argparse.Namespace) -> None:
    engine = await start(args.model or ["mock"], host=args.host, port=args.port, metrics=args.metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {engine.url}", flush=True)
    await stop.wait()
    await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--model", action="append", help="a served model name (repeat); default: mock")
    parser.add_argument("--metrics", choices=("normal", "garbage"), default="normal")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(args))
    else:
        uvloop.run(_main(args))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
    sys.exit(0)
