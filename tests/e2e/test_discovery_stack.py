"""Discovery on a secured ``first up`` as an operator sees it: with the ops credentials of its
embedded server, ``$SRV.PING``/``INFO``/``STATS`` list the gateway, router, scaler and worker the
stack runs, with version, endpoints and counters; ``first services`` shows the same; a worker whose
process is killed is no longer listed; no service trips the server's permissions."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import orjson
import pytest

from shared import discovery
from shared.connect import close, connect
from tests.support import ROOT, Stack, eventually

pytestmark = pytest.mark.slow

CONFIG = """
[nats]
url = ""
subject_prefix = "found"
embedded_store_dir = "store"

[auth]
methods = ["none"]

[scaler]
tick_s = 0.2

[worker]
heartbeat_s = 0.25

[[clusters]]
name = "c1"

[[models]]
id = "sim/a"
engine = { kind = "sim", ttft_ms = 1, itl_ms = 1 }
scaling = { min_hot = 1, max_workers = 1 }
"""
SERVICES = ["first-gateway", "first-router", "first-scaler", "first-worker"]


async def first(stack: Stack, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, "--config", str(stack.config_path),
        cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_an_operator_lists_the_stacks_services_and_a_killed_worker_goes(tmp_path):
    stack = await Stack(CONFIG, tmp_path, name="found").start(ready_models=["sim/a"])
    try:
        store = tmp_path / "store"
        ops = await connect((store / "url").read_text().strip(), "ops", str(store / "credentials" / "ops.nk"))
        try:
            pings = await discovery.ask(ops, "PING", prefix="found")
            assert sorted(p["name"] for p in pings) == SERVICES
            assert {p["version"] for p in pings} == {discovery.version()}
            [worker] = [p for p in pings if p["name"] == "first-worker"]
            assert worker["metadata"]["model"] == "sim/a" and worker["metadata"]["cluster"] == "c1"

            infos = await discovery.ask(ops, "INFO", prefix="found")
            assert all([e["name"] for e in i["endpoints"]] == ["status"] for i in infos)

            async def counters() -> dict | None:
                stats = await discovery.ask(ops, "STATS", prefix="found")
                data = {s["name"]: s["endpoints"][0]["data"] for s in stats}
                return data if data.get("first-scaler", {}).get("nodes") == {"running": 1} else None

            stats = await eventually(
                counters, timeout=10, interval=0.2, what="the scaler's running node in STATS"
            )
            assert stats["first-worker"]["state"] == "ready" and stats["first-scaler"]["clusters"] == ["c1"]

            code, out, err = await first(stack, "services", "--json")
            assert code == 0, err
            rows = orjson.loads(out)
            assert sorted(r["name"] for r in rows) == SERVICES
            assert all(r["stats"]["endpoints"][0]["data"] for r in rows)
            code, out, err = await first(stack, "services")
            assert code == 0, err
            assert "first-worker" in out and f"worker_id={worker['metadata']['worker_id']}" in out

            os.kill(int(worker["metadata"]["pid"]), signal.SIGKILL)

            async def gone() -> bool:
                found = await discovery.ask(ops, "PING", name="first-worker", prefix="found", timeout_s=0.5)
                return worker["id"] not in [p["id"] for p in found]

            await eventually(gone, timeout=10, interval=0.2, what="the killed worker to leave the listing")
        finally:
            await close(ops)
    finally:
        await stack.stop()
    assert [
        line for line in stack.log_path.read_text().splitlines() if "nats_permission_violation" in line
    ] == []
