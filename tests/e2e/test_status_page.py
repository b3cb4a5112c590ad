"""The status page (/status) as a person sees it in a real headless Chromium, on a secured
``first up`` with simulated engines: before signing in, only what FIRST's public
/resource_server/status shows (clusters open to anyone) and a note; with an API key typed into the
page, the models the key may use with their live status, a queue depth that matches the requests
the stack holds, tokens/s, and the scaler's node events. The data endpoint answers 401 without a
key. A screenshot is saved in the test's tmp dir (``FIRST_DOCS_SCREENSHOT=1``: also docs/status.png).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil

import aiohttp
import openai
import pytest

from tests.browser import Browser
from tests.e2e.test_secure_stack import first, served, violations
from tests.support import ROOT, Stack, eventually

pytestmark = pytest.mark.slow

CONFIG = """
[nats]
url = ""
subject_prefix = "page"
embedded_store_dir = "store"

[auth]
methods = ["keys"]

[limits.user]
requests_per_s = 50

[gateway]
status_sample_s = 0.5
status_history_s = 120

[scaler]
tick_s = 0.2

[worker]
heartbeat_s = 0.25

[[clusters]]
name = "polaris"

[[clusters]]
name = "staffonly"
allowed_groups = ["staff"]

[[models]]
id = "sim/busy"
clusters = ["polaris"]
capacity = 1
engine = { kind = "sim", ttft_ms = 1, itl_ms = 1000 }  # about 20 s an answer
scaling = { min_hot = 1, max_workers = 1 }

[[models]]
id = "sim/fast"
clusters = ["polaris"]
engine = { kind = "sim", ttft_ms = 1, itl_ms = 1 }
scaling = { min_hot = 1, max_workers = 1 }

[[models]]
id = "sim/staff"
clusters = ["staffonly"]
allowed_groups = ["staff"]
engine = { kind = "sim" }
"""

HELD = 4  # requests sent to sim/busy: one runs in its one slot, the rest wait in the router

ROWS = """[...document.querySelectorAll('#models tbody tr')].map(r => ({
  model: r.querySelector('.name').innerText, status: r.querySelector('.status').innerText,
  slots: r.querySelector('.slots').innerText, queued: r.querySelector('.queued-now').innerText,
  tokens: r.querySelector('.tokens .now').innerText, charts: r.querySelectorAll('svg polyline').length}))"""
CLUSTERS = """[...document.querySelectorAll('#clusters tbody tr')].map(r =>
  [...r.querySelectorAll('td')].map(td => td.innerText).filter(Boolean).join(' '))"""


@pytest.fixture
async def stack(tmp_path):
    stack = await Stack(CONFIG, tmp_path, name="page").start()
    yield stack
    await stack.stop()


async def test_status_page_in_chromium(stack, tmp_path):
    async with aiohttp.ClientSession() as http, http.get(stack.base_url + "/status.json") as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "unauthorized"

    code, out, err = await first(stack, "keys", "create", "bob", "--groups", "lab")
    assert code == 0, err
    key = out.strip()

    async with Browser.launch(tmp_path) as browser:
        page = await browser.new_page()
        await page.goto(stack.base_url + "/status")

        # Signed out: the clusters open to anyone, as /resource_server/status has them, and a note.
        await page.wait_for("document.body?.dataset.view === 'public'", what="the public view")
        assert await page.evaluate(CLUSTERS) == ["polaris online"]
        note = await page.evaluate("document.getElementById('note').innerText")
        assert "Sign in with an API key" in note
        assert await page.evaluate("document.getElementById('models-section').hidden") is True
        await page.screenshot(tmp_path / "status-public.png")

        await served(stack, key, "sim/fast")
        await served(stack, key, "sim/busy")
        oai = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key=key, max_retries=0, timeout=60)
        chat = {"messages": [{"role": "user", "content": "hi"}]}

        async def hold() -> None:  # a long answer, read until the test ends
            async for _ in await oai.chat.completions.create(model="sim/busy", stream=True, **chat):
                pass

        async def fast_traffic() -> None:  # a few answers a second, for the tokens/s
            while True:
                await oai.chat.completions.create(model="sim/fast", **chat)
                await asyncio.sleep(0.2)

        tasks = [asyncio.create_task(hold()) for _ in range(HELD)] + [asyncio.create_task(fast_traffic())]
        try:
            # Signed in, as a person does it: the key typed into the page's form.
            await page.evaluate(
                f"document.getElementById('key').value = {key!r};"
                "document.getElementById('signin').requestSubmit()"
            )
            await page.wait_for("document.body?.dataset.view === 'full'", what="the signed-in view")

            shown: list = []

            async def busy_and_flowing() -> dict | None:
                shown[:] = await page.evaluate(ROWS)
                rows = {row["model"]: row for row in shown}
                busy, fast = rows.get("sim/busy"), rows.get("sim/fast")
                if busy and fast and busy["queued"] == str(HELD - 1) and float(fast["tokens"]) > 0:
                    return rows
                return None

            try:
                rows = await eventually(busy_and_flowing, timeout=30, interval=0.2, what="the live numbers")
            except AssertionError as exc:
                failed = [t.exception() for t in tasks if t.done()]
                raise AssertionError(f"{exc}; the page showed {shown}; requests failed: {failed}") from None
            assert set(rows) == {"sim/busy", "sim/fast"}  # sim/staff is not for this key
            assert rows["sim/busy"]["status"] == "live" and rows["sim/busy"]["slots"] == "1/1"
            assert rows["sim/fast"]["status"] == "live"
            assert all(row["charts"] == 2 for row in rows.values())  # queue and tokens/s, drawn
            # Workers, slots in use (the busy one's, and the fast one's now and then), nodes in use.
            [polaris] = await page.evaluate(CLUSTERS)  # staffonly is not for this key
            name, status, workers, slots, nodes = polaris.split()
            assert (name, status, workers, nodes) == ("polaris", "online", "2", "2/8")
            assert slots.endswith("/5") and int(slots.split("/")[0]) >= 1
            events = await page.evaluate("document.querySelector('#events ul').innerText")
            assert "node running" in events and "polaris" in events and "sim/busy" in events
            assert "sim/staff" not in await page.evaluate("document.body.innerText")

            shot = await page.screenshot(tmp_path / "status.png")
            if os.environ.get("FIRST_DOCS_SCREENSHOT"):
                shutil.copyfile(shot, ROOT / "docs" / "status.png")
            assert page.errors == []
            assert violations(stack) == []  # the gateway's NATS user may read all this
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, openai.APIError):
                    await task
            await oai.close()
