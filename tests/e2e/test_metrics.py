"""Metrics of a whole ``first up`` with NATS permissions on (its embedded server): the gateway's
/metrics moves as requests flow through the openai SDK, and the exporter that ``first up`` starts
(``[metrics] exporter_port``, as the read-only ops user) shows the worker, its node, the scaler's
decision and the events, then the worker lost when it is killed."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import openai
import pytest

from services.worker.engines.openai_server import free_port
from tests.scrape import moved, scrape, value
from tests.support import Stack, eventually

CONFIG = """
[worker]
heartbeat_s = 0.25
[scaler]
tick_s = 0.2
[metrics]
exporter_port = {port}
[[clusters]]
name = "polaris"
[[models]]
id = "sim/hot"
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 1 }}
scaling = {{ min_hot = 1, max_workers = 1 }}
"""
HOT = {"model": "sim/hot", "cluster": "polaris"}


def worker_pids(config_path: Path) -> list[int]:
    """The ``first worker`` processes the scaler started for this stack's config."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"worker" in argv and str(config_path.resolve()).encode() in argv:
                pids.append(int(proc.name))
    return pids


@pytest.fixture
async def stack(tmp_path):
    port = free_port()
    stack = Stack(CONFIG.format(port=port), tmp_path, name="metrics")
    stack.exporter_url = f"http://127.0.0.1:{port}/metrics"
    await stack.start(ready_models=["sim/hot"])
    yield stack
    code = await stack.stop()
    assert code == 0, f"first up exited with {code} on SIGINT:\n{stack.log_tail()}"
    violations = [line for line in stack.log_path.read_text().splitlines() if "permission_violation" in line]
    assert not violations, "\n".join(violations)


@pytest.mark.slow
async def test_gateway_and_exporter_metrics_of_a_running_stack(stack):
    before = await scrape(stack.base_url + "/metrics")
    client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model="sim/hot", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    )
    assert len([c async for c in stream if c.choices and c.choices[0].delta.content]) == 3
    await client.close()
    after = await scrape(stack.base_url + "/metrics")
    assert moved(before, after, "first_gateway_requests_total", **HOT, endpoint="chat", status="200") == 1
    assert moved(before, after, "first_gateway_tokens_total", **HOT, direction="out") == 3
    assert moved(before, after, "first_gateway_time_to_first_token_seconds_count", **HOT) == 1

    async def federation_shown():
        samples = await scrape(stack.exporter_url)
        # A router beats every second: the exporter, started after it, may not have heard one yet.
        shown = (
            value(samples, "first_workers", **HOT, state="ready")
            == value(samples, "first_routers", what="routers")
            == 1
        )
        return samples if shown else None

    samples = await eventually(federation_shown, what="the worker in the exporter's scrape")
    assert value(samples, "first_worker_slots", **HOT) == 4
    # The exporter started before the scaler: it heard the cold start's node and scaling events.
    assert value(samples, "first_nodes", **HOT, state="running") == 1
    assert value(samples, "first_scaling_actions_total", model="sim/hot", direction="up") >= 1
    assert value(samples, "first_events_total", kind="worker", name="ready") >= 1

    (pid,) = worker_pids(stack.config_path)
    os.kill(pid, signal.SIGKILL)

    async def lost():
        samples = await scrape(stack.exporter_url)
        return samples if value(samples, "first_workers_lost_total", **HOT) == 1 else None

    samples = await eventually(lost, what="the killed worker counted as lost")
    assert value(samples, "first_events_total", kind="node", name="failed") >= 1
