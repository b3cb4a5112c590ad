"""The Globus Compute provider and the function it runs on a node.

``run_node`` goes through globus-compute-endpoint's own engines (a real ProcessPoolEngine and
ThreadPoolEngine in this process), and runs a real ``first worker`` that serves a request over
the test's NATS. The provider talks to ``tests/globus_compute_double.StandInExecutor``, a thin
stand-in for the SDK's Executor (Globus's cloud cannot be reached here) that hands tasks to such
an engine. NATS, the scaler, the router and the workers are real.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson
import pytest

from services.scaler.providers.base import NodeSpec
from services.scaler.providers.globus_compute import GlobusComputeProvider, run_node
from services.scaler.service import Scaler
from shared import config as cfg
from shared import schema
from tests.globus_compute_double import StandInExecutor, start_engine
from tests.support import eventually

ENDPOINT = str(uuid.UUID(int=7))


def write_config(tmp: Path, prefix: str) -> Path:
    path = tmp / "first.toml"
    path.write_text(f"""
[nats]
subject_prefix = "{prefix}"
[scaler]
tick_s = 0.1
start_timeout_s = 60
[worker]
heartbeat_s = 0.2
drain_timeout_s = 2
[[clusters]]
name = "sophia"
provider = "globus_compute"
max_nodes = 2
[clusters.globus_compute]
endpoint_id = "{ENDPOINT}"
endpoint_config = {{ account = "FIRST", walltime = "01:00:00" }}
setup = ["export FIRST_NODE_SETUP=ran"]
[[models]]
id = "m"
capacity = 2
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 1 }}
scaling = {{ min_hot = 0, max_workers = 1, idle_s = 1.5 }}
""")
    return path


def chat() -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


@pytest.fixture
def engine(tmp_path):
    engines = []

    def start(kind: str):
        engines.append(start_engine(kind, str(tmp_path / "endpoint")))
        return engines[-1]

    yield start
    for e in engines:
        e.shutdown(block=False)


async def test_run_node_in_the_endpoints_process_pool_serves_requests_until_its_worker_drains(
    engine, services, tmp_path
):
    config_path = write_config(tmp_path, services.subjects.prefix)
    config = cfg.load_config(config_path)
    provider = GlobusComputeProvider(
        config.cluster("sophia").globus_compute, config_path=str(config_path), nats_url=services.nats_url
    )
    spec = NodeSpec("sophia-node1", "m", "sophia", workers=("sophia-n0",))
    executor = StandInExecutor(engine("ProcessPoolEngine"), endpoint_id=ENDPOINT)
    await services.router(config)
    future = executor.submit(run_node, provider.script(spec))
    client = await services.client(request_timeout_s=30)
    answer = await asyncio.wait_for(client.complete("m", "chat", chat()), 30)
    assert answer.worker_id == "sophia-n0" and answer.texts[0]

    nc = await services.connect()  # as the scaler releases a node it cannot signal
    await nc.publish(
        services.subjects.worker_control("sophia-n0"), schema.encode(schema.WorkerControl(action="drain"))
    )
    result = await asyncio.wait_for(asyncio.wrap_future(future), 20)
    assert result["exit_status"] == 0, result["output"]


async def test_run_node_reports_a_worker_that_cannot_start_with_its_output(engine, tmp_path):
    executor = StandInExecutor(engine("ThreadPoolEngine"), endpoint_id=ENDPOINT)
    script = "echo 'module load conda: no such module' >&2; exit 3"
    result = await asyncio.wait_for(asyncio.wrap_future(executor.submit(run_node, script)), 20)
    assert result == {"exit_status": 3, "output": "module load conda: no such module"}


async def test_globus_compute_nodes_start_on_demand_and_end_when_released(engine, services, tmp_path):
    config_path = write_config(tmp_path, services.subjects.prefix)
    config = cfg.load_config(config_path)
    executors: list[StandInExecutor] = []

    def executor_factory(settings):
        assert settings.endpoint_id == ENDPOINT and settings.endpoint_config == {
            "account": "FIRST",
            "walltime": "01:00:00",
        }
        executors.append(StandInExecutor(engine("ThreadPoolEngine"), endpoint_id=settings.endpoint_id))
        return executors[-1]

    provider = GlobusComputeProvider(
        config.cluster("sophia").globus_compute,
        config_path=str(config_path),
        nats_url=services.nats_url,
        executor_factory=executor_factory,
    )
    await services.router(config)
    scaler = Scaler(await services.connect(), services.subjects, config, {"sophia": provider})
    await services.stack.enter_async_context(scaler)
    client = await services.client(request_timeout_s=30)
    burst = [asyncio.create_task(client.complete("m", "chat", chat())) for _ in range(3)]
    assert all(r.texts[0] for r in await asyncio.wait_for(asyncio.gather(*burst), 30))
    (executor,) = executors
    (task,) = executor.submitted
    assert [d["job_id"] for d in provider.details().values()] == [task.task_id]

    # Idle: the scaler drains the node's workers over NATS; the task returns and the node is gone.
    result = await asyncio.wait_for(asyncio.wrap_future(task), 20)
    assert result["exit_status"] == 0, result["output"]
    await eventually(lambda: not provider.details(), what="the node to be reported gone")
