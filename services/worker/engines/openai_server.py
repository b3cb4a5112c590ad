"""An OpenAI-compatible engine server on the node (vLLM, llama.cpp server, or one already running).

The worker talks HTTP to it with streaming, forwards the client's body (only the model name and the
stream flags are set here), and reads the engine's Prometheus ``/metrics`` for its heartbeat where
the engine has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson
import structlog

from services.worker.engines.base import Engine, Event
from shared import errors, schema
from shared.children import cancel_and_wait, child_process_options, stop_process

_PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+([-+0-9.eE]+|NaN)(?:\s+-?\d+)?\s*$")
# vLLM's metric names (``vllm:kv_cache_usage_perc`` in newer releases, ``gpu_`` before).
_RUNNING = ("vllm:num_requests_running",)
_WAITING = ("vllm:num_requests_waiting",)
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format, enough for a handful of gauges. Label sets (one per data-parallel
    engine, say) are summed, except fractions (``*_perc``), where the fullest one counts."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if m := _METRIC.match(line):
            name = m.group(1)
            with contextlib.suppress(ValueError):
                value = float(m.group(2))
                if name not in values:
                    values[name] = value
                elif name.endswith("_perc"):
                    values[name] = max(values[name], value)
                else:
                    values[name] += value
    return values


def load_from_metrics(values: dict[str, float]) -> schema.EngineLoad:
    def first(names: Sequence[str]) -> float | None:
        return next((values[n] for n in names if n in values), None)

    running, waiting, kv = first(_RUNNING), first(_WAITING), first(_KV)
    return schema.EngineLoad(
        running=None if running is None else int(running),
        waiting=None if waiting is None else int(waiting),
        kv_cache_usage=kv,
    )


class ServerProcess:
    """The engine server as a child process, its output kept for the error message if it dies."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.argv = argv
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: deque[str] = deque(maxlen=30)
        self._drain: asyncio.Task | None = None
        self._log = structlog.get_logger()

    async def start(self) -> None:
        self._log.info("engine_launch", argv=self.argv)
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            **child_process_options(),  # stopped by the worker, after its requests
        )
        self._drain = asyncio.create_task(self._read_output(self.proc), name="engine-output")

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.tail.append(text)
            self._log.debug("engine_output", line=text)

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        await stop_process(proc, grace_s=10)
        await cancel_and_wait(self._drain)


class OpenAIServerEngine(Engine):
    name = "openai"

    def __init__(
        self,
        base_url: str,
        served_model: str,
        *,
        health_path: str = "/v1/models",
        metrics_path: str = "",
        process: ServerProcess | None = None,
        read_timeout_s: float = 600.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.served_model = served_model
        self.health_path = health_path
        self.metrics_path = metrics_path
        self.process = process
        self.read_timeout_s = read_timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.read_timeout_s)
        )
        if self.process is not None:
            await self.process.start()
        try:  # the worker bounds this wait with worker.engine_start_timeout_s
            while not await self._healthy():
                if self.process is not None and self.process.exited:
                    tail = "\n".join(self.process.tail)
                    raise RuntimeError(f"engine server exited during start:\n{tail}")
                await asyncio.sleep(0.25)
        except BaseException:
            await self.stop()
            raise

    async def _healthy(self) -> bool:
        try:
            async with self._session.get(self.base_url + self.health_path) as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def load(self) -> schema.EngineLoad:
        if not self.metrics_path or self._session is None:
            return schema.EngineLoad()
        try:
            # A slow /metrics must not hold up the heartbeat that carries its figures.
            async with asyncio.timeout(1.0), self._session.get(self.base_url + self.metrics_path) as resp:
                return load_from_metrics(parse_metrics(await resp.text()))
        except (aiohttp.ClientError, TimeoutError):
            return schema.EngineLoad()

    async def generate(self, endpoint: schema.Endpoint, body: dict[str, Any]) -> AsyncIterator[Event]:
        if self._session is None:
            raise errors.EngineError("engine is not started")
        payload = dict(body, model=self.served_model, stream=True, stream_options={"include_usage": True})
        usage: schema.Usage | None = None
        completion_deltas = 0
        try:
            async with self._session.post(
                self.base_url + _PATHS[endpoint],
                data=orjson.dumps(payload),
                headers={"Content-Type": "application/json"},
            ) as resp:
                if resp.status != 200:
                    raise _engine_error(resp.status, await resp.read())
                async for data in _sse_data(resp.content):
                    if data == b"[DONE]":
                        break
                    event = orjson.loads(data)
                    if event.get("error"):
                        raise errors.EngineError(_message(event))
                    for choice in event.get("choices") or ():
                        text = _choice_text(endpoint, choice)
                        finish = choice.get("finish_reason")
                        if text or finish:
                            completion_deltas += bool(text)
                            yield schema.Delta(text=text, index=choice.get("index", 0), finish_reason=finish)
                    if u := event.get("usage"):
                        usage = schema.Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))
        except TimeoutError:
            raise errors.EngineTimeout(f"engine sent nothing for {self.read_timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise errors.EngineError(f"engine connection failed: {exc}") from None
        if usage is None:
            # The server ignores stream_options: one streamed delta is one token, and the prompt
            # is counted by the engine's own tokenizer where this class knows it.
            prompt = await self.count_prompt_tokens(endpoint, body)
            usage = schema.Usage(prompt_tokens=prompt, completion_tokens=completion_deltas)
        yield usage

    async def count_prompt_tokens(self, endpoint: schema.Endpoint, body: dict[str, Any]) -> int:
        """The prompt's token count, for servers whose streams carry no usage. 0: unknown."""
        return 0


async def _sse_data(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    async for line in stream:
        line = line.strip()
        if line.startswith(b"data:"):
            yield line[5:].strip()


def _choice_text(endpoint: schema.Endpoint, choice: dict) -> str:
    if endpoint == "completion":
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


def _message(payload: dict) -> str:
    err = payload.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err or payload.get("detail") or payload)


def _engine_error(status: int, raw: bytes) -> errors.FirstError:
    try:
        message = _message(orjson.loads(raw))
    except orjson.JSONDecodeError:
        message = raw.decode(errors="replace")[:500]
    if 400 <= status < 500:
        return errors.BadRequest(f"the engine refused the request: {message}")
    return errors.EngineError(f"engine answered {status}: {message}")
