"""Helpers the tiers share: polling with a deadline, free ports, and ``first up`` as a child process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp

from services.worker.engines.openai_server import free_port

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


async def eventually(
    probe: Callable[[], Awaitable[T] | T], *, timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> T:
    """Call ``probe`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what or probe!r} (last: {last!r})"
            )
        await asyncio.sleep(interval)


class Stack:
    """``first up`` in a child process, with its log kept for the failure message."""

    def __init__(self, config_text: str, tmp: Path, *, name: str = "stack"):
        self.config_path = tmp / f"{name}.toml"
        self.config_path.write_text(config_text)
        self.log_path = tmp / f"{name}.log"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *, ready_models: list[str] = (), timeout: float = 60.0) -> Stack:
        log = self.log_path.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "up", "--config", str(self.config_path),
            "--port", str(self.port), "--log-json",
            cwd=ROOT, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        log.close()

        async def ready() -> bool:
            if self.proc.returncode is not None:
                raise AssertionError(f"first up exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                async with aiohttp.ClientSession() as http, http.get(self.base_url + "/v1/models") as r:
                    if not ready_models:  # it answers (a gateway that wants a key: with 401)
                        return True
                    status = {m["id"]: m["status"] for m in (await r.json())["data"]}
            except aiohttp.ClientError:
                return False
            return all(status.get(m) == "live" for m in ready_models)

        try:
            await eventually(ready, timeout=timeout, interval=0.2, what=f"the stack to serve {ready_models}")
        except BaseException as exc:
            # A fixture that fails in setup gets no teardown: leave no stack running behind.
            with contextlib.suppress(AssertionError):
                await self.stop()
            if isinstance(exc, AssertionError):
                raise AssertionError(f"{exc}\n--- first up log ---\n{self.log_tail()}") from None
            raise
        return self

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(30):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"first up did not stop on SIGINT:\n{self.log_tail()}") from None
