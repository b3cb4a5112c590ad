"""``first`` services as child processes, for tests that kill, stop and restart them.

A ``Fleet`` is one test's set of processes on one subject prefix: it writes the config, starts
routers, workers, a gateway and mock engines (each ``python -m ...`` with its log in a file),
waits for each to be ready by watching NATS or polling HTTP, and kills every process at the end
whatever happened. ``Bus`` is the test's own view of NATS: worker and router heartbeats and the
usage records, as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import orjson

from shared import schema
from shared.client import FirstClient
from shared.config import load_config
from shared.subjects import Subjects
from tests.support import ROOT, eventually, free_port

# Short intervals, so that a failure is noticed within a second or so. Tests state their bounds
# in terms of these.
WORKER_HEARTBEAT_S = 0.3
ROUTER_HEARTBEAT_S = 0.3
MISSED_HEARTBEATS = 3
DISPATCH_TIMEOUT_S = 0.5
SETTINGS: dict[str, dict[str, Any]] = {
    "gateway": {"request_timeout_s": 30, "stall_timeout_s": 60, "sse_keepalive_s": 0.5},
    "router": {
        "heartbeat_s": ROUTER_HEARTBEAT_S,
        "missed_heartbeats": MISSED_HEARTBEATS,
        "dispatch_timeout_s": DISPATCH_TIMEOUT_S,
        "queue_timeout_s": 30,
        "retry_after_s": 2,
    },
    "scaler": {},
    "worker": {"heartbeat_s": WORKER_HEARTBEAT_S},
}


# --- config ------------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def config_text(prefix: str, models: list[dict], **overrides: dict[str, Any]) -> str:
    """A config with the short intervals above (``overrides`` change single settings per section),
    clusters ``a`` and ``b``, and the given models."""
    lines = [f"[nats]\nsubject_prefix = {_toml(prefix)}\n"]
    for section, values in SETTINGS.items():
        merged = {**values, **overrides.get(section, {})}
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in merged.items()]
        lines.append("")
    lines += ['[[clusters]]\nname = "a"\n', '[[clusters]]\nname = "b"\n']
    for model in models:
        lines.append("[[models]]")
        lines += [f"{k} = {_toml(v)}" for k, v in model.items()]
        lines.append("")
    return "\n".join(lines)


# --- one process ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # SIGKILL, not SIGTERM: a child that the test stopped (SIGSTOP) must not outlive the test run.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Proc:
    """One child process with its output in a log file; signals go to it alone."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.router_id = ""  # routers: their id, from the log
        self.url = ""  # gateways and engines: their base URL

    async def start(self) -> Proc:
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # a terminal's Ctrl-C reaches the test run only
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exited(self) -> bool:
        return self.proc is None or self.proc.returncode is not None

    def signal(self, sig: signal.Signals) -> float:
        """Send ``sig``; returns the monotonic time it was sent."""
        if not self.exited:
            self.proc.send_signal(sig)
        return time.monotonic()

    def kill(self) -> float:
        return self.signal(signal.SIGKILL)

    def pause(self) -> float:
        return self.signal(signal.SIGSTOP)

    def resume(self) -> float:
        return self.signal(signal.SIGCONT)

    async def wait(self, timeout: float = 10.0) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def lines(self) -> list[dict]:
        """The JSON log lines; anything else (a crash's raw traceback) as ``{"raw": line}``."""
        out = []
        for line in self.text().splitlines():
            try:
                parsed = orjson.loads(line)
            except orjson.JSONDecodeError:
                parsed = None
            out.append(parsed if isinstance(parsed, dict) else {"raw": line})
        return out

    def events(self, name: str) -> list[dict]:
        return [line for line in self.lines() if line.get("event") == name]

    def tracebacks(self) -> list[dict]:
        """Log lines that carry a traceback."""
        return [
            line
            for line in self.lines()
            if "exception" in line or "Traceback (most recent call last)" in line.get("raw", "")
        ]

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.exited:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")


# --- the test's view of NATS ---------------------------------------------------------------------


@dataclass
class Bus:
    """Heartbeats, router beats and usage records on one prefix, with the time each arrived."""

    nc: Any
    subjects: Subjects
    heartbeats: list[tuple[float, schema.Heartbeat]] = field(default_factory=list)
    router_beats: list[tuple[float, schema.RouterBeat]] = field(default_factory=list)
    usage: list[schema.UsageRecord] = field(default_factory=list)

    async def start(self) -> None:
        s = self.subjects
        beats = s.router_heartbeat("X").replace(".X.", ".*.")
        for subject, cb in (
            (s.heartbeat_all, self._on_heartbeat),
            (beats, self._on_router_beat),
            (s.usage, self._on_usage),
        ):
            await self.nc.subscribe(subject, cb=cb)
        await self.nc.flush()

    async def _on_heartbeat(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            self.heartbeats.append((time.monotonic(), schema.heartbeat_decoder.decode(msg.data)))

    async def _on_router_beat(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            self.router_beats.append((time.monotonic(), schema.router_beat_decoder.decode(msg.data)))

    async def _on_usage(self, msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            self.usage.append(schema.usage_decoder.decode(msg.data))

    def beats_of(self, worker_id: str, since: float = 0.0) -> list[tuple[float, schema.Heartbeat]]:
        return [(t, b) for t, b in self.heartbeats if b.worker_id == worker_id and t >= since]

    def last_router_beat(self, router_id: str) -> schema.RouterBeat | None:
        found = [b for _, b in self.router_beats if b.router_id == router_id]
        return found[-1] if found else None

    def first_router_beat_at(self, router_id: str) -> float | None:
        """Wall-clock time (``time.time()``) at which the router's first beat was received here."""
        for t, b in self.router_beats:
            if b.router_id == router_id:
                return time.time() - (time.monotonic() - t)
        return None

    def records(self, request_ids: set[str] | None = None) -> list[schema.UsageRecord]:
        return [r for r in self.usage if request_ids is None or r.request_id in request_ids]

    def ok_runs(self, request_ids: set[str]) -> Counter:
        """How many runs of each request ended "ok" (every id present, 0 where none did)."""
        counts = Counter({rid: 0 for rid in request_ids})
        counts.update(r.request_id for r in self.records(request_ids) if r.outcome == "ok")
        return counts


# --- a test's processes --------------------------------------------------------------------------


class Fleet:
    """One test's ``first`` processes on one prefix. ``close()`` kills them all."""

    def __init__(self, tmp: Path, nats_url: str, prefix: str):
        self.tmp, self.nats_url = tmp, nats_url
        self.subjects = Subjects(prefix)
        self.config_path = tmp / "first.toml"
        self.config = None
        self.procs: list[Proc] = []
        self.nc = None
        self.bus: Bus | None = None
        self._clients: list[FirstClient] = []

    def configure(self, models: list[dict], **overrides: dict[str, Any]) -> Fleet:
        self.config_path.write_text(config_text(self.subjects.prefix, models, **overrides))
        self.config = load_config(self.config_path)  # a mistake in a test's config fails here
        return self

    async def start(self) -> Fleet:
        self.nc = await nats.connect(self.nats_url, name="fault-test", max_reconnect_attempts=-1)
        self.bus = Bus(self.nc, self.subjects)
        await self.bus.start()
        return self

    async def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.stop()
        for proc in self.procs:
            if not proc.exited:
                proc.kill()
        for proc in self.procs:
            if proc.proc is not None:
                with contextlib.suppress(TimeoutError):
                    await proc.wait(10)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    def report(self) -> str:
        """Every process's log tail, for a failed test's report."""
        return "\n".join(f"--- {p.name} (pid {p.pid}) ---\n{p.tail(40)}" for p in self.procs if p.proc)

    # --- starting ------------------------------------------------------------------------------

    async def _spawn(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.tmp / f"{name}.log")
        self.procs.append(proc)
        return await proc.start()

    async def first(self, name: str, command: str, *args: str) -> Proc:
        """``first <command>`` on this fleet's config and NATS server, not waited for."""
        argv = [sys.executable, "-m", "services.cli", command, "--config", str(self.config_path)]
        argv += ["--nats", self.nats_url, "--log-json", *args]
        return await self._spawn(name, argv)

    async def _until(self, proc: Proc, probe, what: str, timeout: float) -> Any:
        async def check():
            proc.check_alive()
            result = probe()
            return await result if asyncio.iscoroutine(result) else result

        try:
            return await eventually(check, timeout=timeout, interval=0.05, what=f"{proc.name}: {what}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{proc.tail()}") from None

    async def router(self, name: str = "router", timeout: float = 20.0) -> Proc:
        """A router, ready once its heartbeats arrive (its subscriptions are in place by then)."""
        proc = await self.first(name, "router")

        def started() -> str:
            return next((e.get("router_id", "") for e in proc.events("router_started")), "")

        proc.router_id = await self._until(proc, started, "router_started in its log", timeout)
        await self._until(
            proc, lambda: self.bus.last_router_beat(proc.router_id), "its first heartbeat", timeout
        )
        return proc

    async def worker(self, worker_id: str, model: str, cluster: str = "a", timeout: float = 20.0) -> Proc:
        """A worker, ready once it heartbeats in state ``ready``."""
        proc = await self.first(
            worker_id, "worker", "--cluster", cluster, "--model", model, "--worker-id", worker_id
        )

        def ready() -> bool:
            return any(b.state == "ready" for _, b in self.bus.beats_of(worker_id))

        await self._until(proc, ready, "a ready heartbeat", timeout)
        return proc

    async def gateway(self, name: str = "gateway", timeout: float = 20.0) -> Proc:
        """A gateway, ready once ``/health`` answers 200 (it is connected to NATS)."""
        port = free_port()
        proc = await self.first(name, "gateway", "--port", str(port))
        proc.url = f"http://127.0.0.1:{port}"

        async def healthy() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(proc.url + "/health") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await self._until(proc, healthy, "/health to answer 200", timeout)
        return proc

    async def mock_engine(self, name: str = "engine", *args: str, timeout: float = 20.0) -> Proc:
        """``python -m tests.mock_engine`` on a free port, ready once it says it listens."""
        port = free_port()
        argv = [sys.executable, "-m", "tests.mock_engine", "--port", str(port), *args]
        proc = await self._spawn(name, argv)
        proc.url = f"http://127.0.0.1:{port}"
        await self._until(
            proc, lambda: "listening on" in proc.text(), "'listening on' in its output", timeout
        )
        return proc

    async def routed(self, worker_ids: list[str], timeout: float = 10.0) -> None:
        """Every router started so far has heard every one of these workers say it is ready: a ready
        heartbeat each worker sent after each router's first beat reached this test."""
        routers = [p for p in self.procs if p.router_id and not p.exited]

        def heard() -> bool:
            since = max((self.bus.first_router_beat_at(p.router_id) or 0.0) for p in routers)
            return all(
                any(b.state == "ready" and b.sent > since for _, b in self.bus.beats_of(w))
                for w in worker_ids
            )

        await eventually(heard, timeout=timeout, what=f"the routers to hear of {worker_ids}")

    async def client(self, **kw: Any) -> FirstClient:
        """The NATS-native client on this fleet's prefix (stopped by ``close``)."""
        kw.setdefault("missed_heartbeats", MISSED_HEARTBEATS)
        client = FirstClient(self.nc, self.subjects, **kw)
        await client.start()
        self._clients.append(client)
        return client


def chat_body(model: str, text: str = "hello there", **extra: Any) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}], **extra})


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, bytes]]:
    """The ``data:`` payloads of an SSE response as they arrive, each with its monotonic time;
    comments (keep-alives) are skipped."""
    async for line in response.content:
        line = line.strip()
        if line.startswith(b"data:"):
            yield time.monotonic(), line[5:].strip()
