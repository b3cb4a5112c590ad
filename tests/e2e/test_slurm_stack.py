"""``first up`` on a real single-node Slurm (tests/slurm_fixture.py): its own embedded NATS with
permissions on, so the worker in the batch job connects with its slot's seed as a site's would."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.slurm_fixture import SlurmCluster, slurm  # noqa: F401 (the fixture)
from tests.support import Stack, eventually

pytestmark = pytest.mark.slow

CONFIG = """
[scaler]
tick_s = 0.2
[worker]
heartbeat_s = 0.25
drain_timeout_s = 2
[[clusters]]
name = "hpc"
provider = "slurm"
max_nodes = 1
[clusters.slurm]
work_dir = "{jobs}"
poll_interval_s = 0.5
cancel_grace_s = 2
[[models]]
id = "sim/cold"
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 1 }}
scaling = {{ min_hot = 0, max_workers = 1 }}
"""


def running_jobs(cluster: SlurmCluster) -> list[str]:
    out = cluster.run("squeue", "--noheader", "--states=pending,running", "--format=%j").stdout
    return out.split()


async def test_first_up_answers_from_a_slurm_job_and_cancels_it_when_stopped(
    slurm: SlurmCluster,  # noqa: F811
    monkeypatch,
    tmp_path,
):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))  # first up inherits it
    stack = await Stack(CONFIG.format(jobs=tmp_path / "jobs"), tmp_path, name="slurm").start()
    try:
        oai = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        answer = await oai.chat.completions.create(
            model="sim/cold", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        await oai.close()
        assert answer.usage.completion_tokens == 2
        jobs = await asyncio.to_thread(running_jobs, slurm)
        assert len(jobs) == 1 and jobs[0].startswith("first-hpc-"), jobs
        assert "--credentials" in next((tmp_path / "jobs").glob("*.sh")).read_text()
    finally:
        code = await stack.stop()
    assert code == 0, stack.log_tail()
    await eventually(
        lambda: not running_jobs(slurm), timeout=10, what="first up's orderly stop to end its job"
    )
