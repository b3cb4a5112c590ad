"""An OpenAI-compatible engine server on the node (vLLM, llama.cpp server, or one already running).

The worker talks HTTP to it with streaming, forwards the client's body (only the model name and the
stream flags are set here), and reads the engine's Prometheus ``/metrics`` for its heartbeat where
the engine has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import orjson
import structlog

from services.worker.engines import answers
from services.worker.engines.base import Batch, Engine
from services.worker.engines.http import EngineClient, EngineHTTPError, EngineHTTPTimeout
from shared import errors, schema, vectors
from shared.children import cancel_and_wait, child_process_options, stop_process

_PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


class _Vector(msgspec.Struct):
    embedding: list[Any]  # floats, or (no pooling) a list of floats per token of the input
    index: int = 0


class _EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int = 0


class _Embeddings(msgspec.Struct):
    data: list[_Vector]
    usage: _EmbeddingUsage | None = None


_embeddings_decoder = msgspec.json.Decoder(_Embeddings)
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
    engine, say) are summed, except fractions (``*_perc``), where the fullest one counts.
    Lines that do not parse, and values that are not finite non-negative numbers, are skipped."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if m := _METRIC.match(line):
            name = m.group(1)
            with contextlib.suppress(ValueError):
                value = float(m.group(2))
                if not math.isfinite(value) or value < 0:
                    continue
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
        running=None if running is None else min(int(running), 1_000_000_000),
        waiting=None if waiting is None else min(int(waiting), 1_000_000_000),
        kv_cache_usage=None if kv is None else min(kv, 1.0),
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
        self._http: EngineClient | None = None
        self._log = structlog.get_logger()

    async def start(self) -> None:
        if self._http is not None:
            return
        self._http = EngineClient(self.base_url, read_timeout_s=self.read_timeout_s)
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
        await self._check_served_model()

    async def _healthy(self) -> bool:
        try:
            status, _ = await self._http.get(self.health_path, timeout_s=5)
        except (EngineHTTPError, TimeoutError):
            return False
        return status == 200

    async def _check_served_model(self) -> None:
        """Say at start, in the log, when the engine does not serve the name the config gives."""
        try:
            _, raw = await self._http.get("/v1/models", timeout_s=5)
            listed = [m.get("id") for m in orjson.loads(raw).get("data", [])]
        except Exception:  # an engine without /v1/models: nothing to check against
            return
        if listed and self.served_model not in listed:
            self._log.error(
                "engine_model_mismatch",
                served_model=self.served_model,
                engine_serves=listed[:20],
                hint="set models[].engine.served_model in the config to one of these",
            )

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    async def load(self) -> schema.EngineLoad:
        if not self.metrics_path or self._http is None:
            return schema.EngineLoad()
        try:
            # A slow /metrics must not hold up the heartbeat that carries its figures.
            _, raw = await self._http.get(self.metrics_path, timeout_s=1.0)
            return load_from_metrics(parse_metrics(raw.decode(errors="replace")))
        except (EngineHTTPError, TimeoutError, ValueError):
            return schema.EngineLoad()

    async def generate(
        self, endpoint: schema.Endpoint, body: dict[str, Any], *, stream: bool = True
    ) -> AsyncIterator[Batch]:
        if self._http is None:
            raise errors.EngineError("engine is not started")
        payload = dict(body, model=self.served_model, stream=stream)
        if stream:
            payload["stream_options"] = {"include_usage": True}
        else:
            payload.pop("stream_options", None)
        usage_seen, tokens = False, 0
        try:
            accept = "text/event-stream" if stream else "application/json"
            async with self._http.request(
                "POST", _PATHS[endpoint], orjson.dumps(payload), accept=accept
            ) as resp:
                if resp.status != 200:
                    raise self._engine_error(resp.status, await resp.read(), resp.headers.get("retry-after"))
                if not stream:
                    batch = answers.whole(endpoint, await resp.read())
                    usage_seen = batch.usage is not None
                    yield batch
                else:
                    async for batch in answers.streamed(endpoint, resp.blocks()):
                        usage_seen = usage_seen or batch.usage is not None
                        tokens += batch.tokens
                        yield batch
        except EngineHTTPTimeout:
            raise errors.EngineTimeout(f"the engine sent nothing for {self.read_timeout_s:g} s") from None
        except EngineHTTPError as exc:
            self._log.warning("engine_connection_failed", error=str(exc))
            raise errors.EngineError("the connection to the engine failed") from None
        except msgspec.DecodeError as exc:
            self._log.warning("engine_answer_malformed", error=str(exc)[:300])
            raise errors.EngineError("the engine sent a malformed answer") from None
        if not usage_seen:
            # The server ignores stream_options: one streamed event is one token, and the prompt
            # is counted by the engine's own tokenizer where this class knows it.
            prompt = await self.count_prompt_tokens(endpoint, body)
            yield Batch(usage=schema.Usage(prompt_tokens=prompt, completion_tokens=tokens))

    async def embed(self, body: dict[str, Any]) -> tuple[list[bytes], schema.Usage]:
        """The engine's /v1/embeddings, asked for floats (llama.cpp's server knows no base64); a
        causal model's per-token vectors are mean-pooled (vectors.pooled)."""
        if self._http is None:
            raise errors.EngineError("engine is not started")
        count = len(vectors.inputs(body))
        payload = dict(body, model=self.served_model, encoding_format="float")
        try:
            async with self._http.request(
                "POST", "/v1/embeddings", orjson.dumps(payload), accept="application/json"
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise self._engine_error(resp.status, raw, resp.headers.get("retry-after"))
            answer = _embeddings_decoder.decode(raw)
        except EngineHTTPTimeout:
            raise errors.EngineTimeout(f"the engine sent nothing for {self.read_timeout_s:g} s") from None
        except EngineHTTPError as exc:
            self._log.warning("engine_connection_failed", error=str(exc))
            raise errors.EngineError("the connection to the engine failed") from None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._log.warning("engine_answer_malformed", error=str(exc)[:300])
            raise errors.EngineError("the engine sent a malformed answer") from None
        rows = sorted(answer.data, key=lambda d: d.index)
        if len(rows) != count:
            raise errors.EngineError(f"the engine sent {len(rows)} vectors for {count} inputs")
        usage = schema.Usage(prompt_tokens=answer.usage.prompt_tokens if answer.usage else 0)
        try:
            return [vectors.pack(vectors.pooled(r.embedding)) for r in rows], usage
        except (TypeError, ValueError):  # not numbers, or token vectors of unequal lengths
            raise errors.EngineError("the engine sent a malformed answer") from None

    def _engine_error(self, status: int, raw: bytes, retry_after: str | None) -> errors.FirstError:
        """The engine's refusal, in terms the caller (or for our own mistakes, an operator) can act on."""
        try:
            message = answers.message(orjson.loads(raw))
        except (orjson.JSONDecodeError, TypeError):
            message = raw.decode(errors="replace")
        message = message[:500]
        if status == 404:
            self._log.error("engine_model_mismatch", served_model=self.served_model, engine_said=message)
            return errors.EngineError(
                f"the engine does not serve the model '{self.served_model}' that this worker's config names"
                " (models[].engine.served_model); an operator must fix the config"
            )
        if status == 429:
            return errors.NoCapacity(
                "the engine is overloaded; try again shortly", retry_after_s=_seconds(retry_after)
            )
        if status == 413:
            return errors.PayloadTooLarge(f"the engine refused the request as too large: {message}")
        if status in (401, 403):
            self._log.error("engine_refused_worker", status=status, engine_said=message)
            return errors.EngineError("the engine refused the worker's credentials; an operator must fix it")
        if 400 <= status < 500:
            return errors.BadRequest(f"the engine refused the request: {message}")
        self._log.warning("engine_failed", status=status, engine_said=message)
        return errors.EngineError(f"the engine failed (HTTP {status})")


def _seconds(header: str | None, default: float = 1.0) -> float:
    try:
        value = float(header) if header else default
    except ValueError:
        return default
    return min(max(value, 0.0), 3600.0) if math.isfinite(value) else default
