"""Batches across SIGKILL: of the batch service, of a worker, of the NATS server. Every line of
the input comes out exactly once (counted by custom_id), and the batch completes."""

from __future__ import annotations

import asyncio
import io
import sys

import openai
import orjson
import pytest

from shared.config import load_config
from tests.support import eventually

pytestmark = pytest.mark.faults

LINES = 300
MODEL = {
    "id": "m",
    "capacity": 16,
    "engine": {"kind": "sim", "ttft_ms": 1, "itl_ms": 15, "default_max_tokens": 5},
}
# request_timeout_s: a worker killed after accepting a dispatch but before its Started leaves the
# request with nobody who knows (the router handed it over; the caller never heard of the worker):
# the line is tried again after this long (reported as a request-path gap, outside batch mode).
BATCH = "\n[batch]\nack_wait_s = 2\nprogress_s = 0.1\nrequest_timeout_s = 5\nlease_ttl_s = 2\n"


def _configure(fleet) -> None:
    fleet.configure([MODEL])
    with fleet.config_path.open("a") as f:
        f.write(BATCH)
    fleet.config = load_config(fleet.config_path)


async def _batch_service(fleet, name: str):
    argv = [sys.executable, "-m", "services.cli", "batch", "serve", "--config", str(fleet.config_path)]
    argv += ["--nats", fleet.nats_url, "--log-json"]
    proc = await fleet._spawn(name, argv)
    await fleet._until(proc, lambda: proc.events("batch_service_started"), "batch_service_started", 20)
    return proc


async def _submit(oai) -> str:
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}}
        for i in range(LINES)
    ]  # fmt: skip
    data = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    upload = await oai.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await oai.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


async def _progress(oai, batch_id: str, at_least: int, timeout: float = 30.0):
    async def far_enough():
        b = await oai.batches.retrieve(batch_id)
        return b if b.request_counts.completed >= at_least or b.status == "completed" else None

    return await eventually(far_enough, timeout=timeout, interval=0.05, what=f"{at_least} lines done")


async def _all_out_once(oai, batch_id: str) -> None:
    seen = []

    async def completed():
        b = await oai.batches.retrieve(batch_id)
        seen[:] = [b.status, b.request_counts]
        assert b.status not in ("failed", "cancelled", "expired"), b
        return b if b.status == "completed" else None

    try:
        batch = await eventually(completed, timeout=60, interval=0.2, what="the batch to complete")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen}") from None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        LINES,
        LINES,
        0,
    )
    out = [
        orjson.loads(line) for line in (await oai.files.content(batch.output_file_id)).content.splitlines()
    ]
    ids = [o["custom_id"] for o in out]
    assert len(ids) == LINES, f"{len(ids)} lines out for {LINES} in"
    assert set(ids) == {f"c{i}" for i in range(LINES)}, "a line is missing or answered twice"


@pytest.fixture
async def oai_of():
    clients = []

    def make(url: str):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=2, timeout=30)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def test_batch_service_killed_mid_batch_resumes_without_losing_or_repeating_a_line(fleet, oai_of):
    _configure(fleet)
    _, _, gateway, service = await asyncio.gather(
        fleet.router(), fleet.worker("wa", "m"), fleet.gateway(), _batch_service(fleet, "batch1")
    )
    oai = oai_of(gateway.url)
    batch_id = await _submit(oai)
    before = await _progress(oai, batch_id, 60)
    assert before.status == "in_progress", "the batch ended before the kill: make it longer"
    service.kill()
    await service.wait()
    await _batch_service(fleet, "batch2")
    await _all_out_once(oai, batch_id)


async def test_a_worker_killed_mid_batch_costs_no_line(fleet, oai_of):
    _configure(fleet)
    _, wa, _, gateway, _ = await asyncio.gather(
        fleet.router(), fleet.worker("wa", "m"), fleet.worker("wb", "m"), fleet.gateway(),
        _batch_service(fleet, "batch"),
    )  # fmt: skip
    await fleet.routed(["wa", "wb"])
    oai = oai_of(gateway.url)
    batch_id = await _submit(oai)
    assert (await _progress(oai, batch_id, 60)).status == "in_progress", "the batch ended before the kill"
    wa.kill()
    await _all_out_once(oai, batch_id)


async def test_nats_restarted_mid_batch_costs_no_line(own_fleet, restartable_nats, oai_of):
    fleet = own_fleet
    _configure(fleet)
    _, _, gateway, _ = await asyncio.gather(
        fleet.router(), fleet.worker("wa", "m"), fleet.gateway(), _batch_service(fleet, "batch")
    )
    oai = oai_of(gateway.url)
    batch_id = await _submit(oai)
    assert (await _progress(oai, batch_id, 60)).status == "in_progress", "the batch ended before the restart"
    await restartable_nats.stop()
    await restartable_nats.start()
    await _all_out_once(oai, batch_id)


async def test_a_router_killed_mid_batch_costs_no_line(fleet, oai_of):
    _configure(fleet)
    ra, _, _, gateway, _ = await asyncio.gather(
        fleet.router("ra"), fleet.router("rb"), fleet.worker("wa", "m"), fleet.gateway(),
        _batch_service(fleet, "batch"),
    )  # fmt: skip
    await fleet.routed(["wa"])
    oai = oai_of(gateway.url)
    batch_id = await _submit(oai)
    assert (await _progress(oai, batch_id, 60)).status == "in_progress", "the batch ended before the kill"
    ra.kill()
    await _all_out_once(oai, batch_id)


async def test_a_standby_batch_service_takes_over_when_the_running_one_is_killed(fleet, oai_of):
    """Two batch services: one runs the batches, the other stands by (the lease) and takes over
    within the lease's ttl once the first is killed."""
    _configure(fleet)
    _, _, gateway, first = await asyncio.gather(
        fleet.router(), fleet.worker("wa", "m"), fleet.gateway(), _batch_service(fleet, "batch1")
    )
    await fleet._until(first, lambda: first.events("batch_lease_taken"), "batch1 to take the lease", 10)
    second = await _batch_service(fleet, "batch2")
    oai = oai_of(gateway.url)
    batch_id = await _submit(oai)
    assert (await _progress(oai, batch_id, 60)).status == "in_progress", "the batch ended before the kill"
    assert not second.events("batch_lease_taken"), "both services ran batches"
    first.kill()
    await _all_out_once(oai, batch_id)
    assert second.events("batch_lease_taken")
