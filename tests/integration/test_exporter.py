"""The exporter's scrape as Prometheus reads it: a real router, a real ``first worker`` process (killed
with SIGKILL), a real gateway that refuses over a limit, all on the session's nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import aiohttp
import openai
import pytest

from services.exporter.service import Exporter
from services.gateway.app import create_app
from services.worker.engines.openai_server import free_port
from shared import events, schema
from tests.integration.conftest import make_config, table_auth
from tests.scrape import scrape, value
from tests.support import ROOT, eventually

WORKER_CONFIG = """
[nats]
subject_prefix = "{prefix}"
[worker]
heartbeat_s = 0.2
[[clusters]]
name = "a"
[[models]]
id = "m"
capacity = 3
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 1 }}
"""


@pytest.fixture
async def exporter(services, subjects):
    """``await exporter(config)``: an exporter on a free loopback port; its /metrics URL."""

    async def start(config) -> str:
        e = Exporter(await services.connect(), subjects, config, "127.0.0.1", 0)
        await services.stack.enter_async_context(e)
        return e.url + "/metrics"

    return start


@contextlib.asynccontextmanager
async def worker_process(tmp_path, nats_url: str, prefix: str, worker_id: str):
    """``first worker`` as a child process, as a node runs it; killed at the end if still alive."""
    path = tmp_path / "worker.toml"
    path.write_text(WORKER_CONFIG.format(prefix=prefix))
    log = (tmp_path / "worker.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "worker", "--config", str(path), "--nats", nats_url,
        "--cluster", "a", "--model", "m", "--worker-id", worker_id, "--log-json",
        cwd=ROOT, stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_worker_and_its_slots_appear_and_go_when_it_is_killed(
    services, subjects, exporter, nats_url, tmp_path
):
    config = make_config([{"id": "m", "capacity": 3}], nats={"subject_prefix": subjects.prefix})
    url = await exporter(config)
    nc = await services.connect()
    # Garbage on every subject it reads first: it must go on with the next good message.
    for subject in (subjects.heartbeat("a", "junk"), subjects.demand, subjects.event("node", "running", "x")):
        await nc.publish(subject, b"\xc1 not a message")
    ready = {"model": "m", "cluster": "a"}
    async with worker_process(tmp_path, nats_url, subjects.prefix, "a-w1") as proc:

        async def worker_shown():
            samples = await scrape(url)
            return samples if value(samples, "first_workers", **ready, state="ready") == 1 else None

        samples = await eventually(worker_shown, timeout=30, what="the worker in the exporter's scrape")
        assert value(samples, "first_worker_slots", **ready) == 3
        assert value(samples, "first_worker_slots_in_use", **ready) == 0
        assert value(samples, "first_workers", **ready, state="draining") == 0
        proc.send_signal(signal.SIGKILL)  # no last heartbeat, no event: only silence tells
        await proc.wait()

        async def worker_gone():
            samples = await scrape(url)
            return value(samples, "first_workers", **ready, state="ready") is None

        await eventually(worker_gone, timeout=5, what="the killed worker to leave the scrape")
    assert value(await scrape(url), "first_worker_slots", **ready) is None


async def test_held_requests_show_as_queue_depth_and_wait(services, subjects, exporter):
    config = make_config([{"id": "cold"}], nats={"subject_prefix": subjects.prefix})
    url = await exporter(config)
    await services.router(config)
    client = await services.client(request_timeout_s=30)
    async with client.open("cold", "completion", b'{"model": "cold", "prompt": "hi"}'):

        async def held():
            samples = await scrape(url)
            return samples if value(samples, "first_queue_depth", model="cold", cluster="any") == 1 else None

        samples = await eventually(held, what="the held request in the exporter's scrape")
        assert value(samples, "first_queue_oldest_wait_seconds", model="cold", cluster="any") >= 0
        assert value(samples, "first_routers", what="routers") == 1
        assert value(samples, "first_exporter_nats_reconnects_total") == 0


async def test_limit_refusals_at_a_gateway_are_counted_from_its_events(services, subjects, exporter):
    config = make_config(
        [{"id": "m"}],
        nats={"subject_prefix": subjects.prefix},
        auth={"methods": ["keys"]},
        limits={"user": {"requests_per_s": 1, "model_requests_per_s": 0, "tokens_per_min": 0}},
    )
    url = await exporter(config)
    await services.router(config)
    await services.worker(config, "m")
    app = create_app(config, services.nats_url)
    table_auth(app, {"alice": schema.Identity(user="alice", kind="key")})
    gateway = await services.gateway(app)
    client = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="alice", max_retries=0)
    answers = await asyncio.gather(
        *(client.completions.create(model="m", prompt="hi", max_tokens=1) for _ in range(3)),
        return_exceptions=True,
    )
    await client.close()
    assert sum(isinstance(a, openai.RateLimitError) for a in answers) >= 1

    async def counted():
        # One event a minute per user and model (the others are told in the next one's left_out).
        return value(await scrape(url), "first_limit_refusals_total", model="m") == 1

    await eventually(counted, what="the refusal in the exporter's scrape")
    async with aiohttp.ClientSession() as http, http.get(url.replace("/metrics", "/health")) as r:
        assert r.status == 200 and (await r.json())["nats"] is True


async def test_nodes_up_before_it_started_come_from_the_event_stream(services, subjects, exporter):
    """The scaler's node events of earlier, in the event stream: an exporter started later shows
    the nodes still up, and a live event then moves one on."""
    config = make_config([{"id": "m"}], nats={"subject_prefix": subjects.prefix})
    nc = await services.connect()
    await events.ensure(nc, config)
    scaler = events.EventPublisher(nc, subjects, "scaler")
    for node, name in (
        ("a-n0", "requested"),
        ("a-n1", "requested"),
        ("a-n0", "running"),
        ("a-n1", "released"),
    ):
        await scaler.emit("node", name, cluster="a", model="m", node_id=node)
    js = nc.jetstream()

    async def stored() -> bool:
        return (await js.stream_info(events.stream_name(config))).state.messages == 4

    await eventually(stored, what="the node events in the event stream")
    url = await exporter(config)
    samples = await scrape(url)
    node = {"cluster": "a", "model": "m"}
    assert value(samples, "first_nodes", **node, state="running") == 1
    assert value(samples, "first_nodes", **node, state="requested") is None
    assert value(samples, "first_events_total", kind="node", name="running") is None  # counters: live only
    await scaler.emit("node", "stopping", cluster="a", model="m", node_id="a-n0")

    async def stopping():
        return value(await scrape(url), "first_nodes", **node, state="stopping") == 1

    await eventually(stopping, what="the live event to move the node on")


async def test_first_exporter_serves_until_sigterm_and_a_taken_port_is_one_line(subjects, nats_url, tmp_path):
    path = tmp_path / "first.toml"
    path.write_text(WORKER_CONFIG.format(prefix=subjects.prefix))
    port = free_port()

    def command(*args):
        return asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "exporter", "--config", str(path), "--nats", nats_url,
            "--port", str(port), *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    first = await command()
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        async def serving():
            with contextlib.suppress(aiohttp.ClientError):
                return value(await scrape(url), "first_exporter_nats_reconnects_total") == 0

        await eventually(serving, timeout=20, what="first exporter to serve")
        second = await command()
        _, err = await asyncio.wait_for(second.communicate(), 20)
        assert second.returncode == 2
        said = f"first exporter: the exporter cannot listen on 127.0.0.1:{port}: "
        assert [line for line in err.decode().splitlines() if line.startswith(said)], err.decode()
        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), 10) == 0
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
