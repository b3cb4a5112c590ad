"""A real headless Chromium (Debian's ``chromium``), driven over the DevTools protocol with
aiohttp's websocket client: nothing to download, no driver to match to the browser's version.

    async with Browser.launch(tmp_path) as browser:
        page = await browser.new_page()
        await page.goto(url)
        text = await page.evaluate("document.body.innerText")
        await page.screenshot(tmp_path / "page.png")
        assert page.errors == []  # uncaught exceptions, console errors, CSP refusals

Skips the test when no chromium is installed (tools/sysdeps installs it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import re
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import eventually

_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 15.0


class ProtocolError(Exception):
    pass


class Page:
    """One tab: commands and their answers over its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = msg.json()
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._on_event(data.get("method", ""), data.get("params", {}))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ProtocolError("the browser closed the connection"))

    def _on_event(self, method: str, params: dict) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(
                " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            )
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            if entry.get("source") != "network":  # a 401 the page expects is logged as one
                self.errors.append(entry.get("text", ""))

    async def call(self, method: str, **params: Any) -> dict:
        n = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[n] = future
        await self.ws.send_json({"id": n, "method": method, "params": params})
        answer = await asyncio.wait_for(future, CALL_TIMEOUT_S)
        if "error" in answer:
            raise ProtocolError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    async def goto(self, url: str) -> None:
        result = await self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise ProtocolError(f"cannot open {url}: {result['errorText']}")

    async def evaluate(self, expression: str) -> Any:
        """The expression's value (JSON-able), awaited if it is a promise."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise ProtocolError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, timeout: float = 15.0, what: str = "") -> Any:
        """Poll a JS expression until it is truthy; its value."""
        return await eventually(lambda: self.evaluate(expression), timeout=timeout, interval=0.1, what=what)

    async def screenshot(self, path: Path) -> Path:
        result = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(result["data"]))
        return path

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Browser:
    def __init__(self, proc: asyncio.subprocess.Process, endpoint: str, http: aiohttp.ClientSession):
        self.proc, self.endpoint, self.http = proc, endpoint, http
        self.pages: list[Page] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, tmp: Path, *, width: int = 1280, height: int = 900):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.skip("no chromium (tools/sysdeps installs Debian's)")
        args = [
            exe, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-sync",
            "--disable-dev-shm-usage", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={width},{height}",
        ]  # fmt: skip
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root (CI containers)
        proc = await asyncio.create_subprocess_exec(
            *args, "about:blank", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        http = aiohttp.ClientSession()
        drain, browser = None, None
        try:
            endpoint = await _devtools_endpoint(proc)
            # Keep reading its stderr so that the browser never blocks on a full pipe.
            drain = asyncio.create_task(_drain(proc.stderr))
            browser = cls(proc, endpoint, http)
            yield browser
        finally:
            for page in browser.pages if browser is not None else []:
                await page.close()
            await http.close()
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            if drain is not None:
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain

    async def new_page(self) -> Page:
        """A fresh tab, with its errors reported and a fixed viewport."""
        async with self.http.put(f"http://{self.endpoint}/json/new?about:blank") as r:
            target = await r.json()
        ws = await self.http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        self.pages.append(page)
        for domain in ("Page", "Runtime", "Log"):
            await page.call(f"{domain}.enable")
        return page


async def _devtools_endpoint(proc: asyncio.subprocess.Process) -> str:
    """host:port of the browser's DevTools, from the line it prints once it listens."""
    seen = b""
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while line := await proc.stderr.readline():
                seen += line
                if found := _LISTENING.search(line):
                    return found.group(1).decode().split("/")[2]
    except TimeoutError:
        pass
    raise AssertionError(
        f"chromium did not start its DevTools server:\n{seen.decode(errors='replace')[-2000:]}"
    )


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
