"""The PBS provider against qsub/qstat/qdel stand-ins (tests/doubles/pbs: OpenPBS is not packaged
here). The stand-ins are test doubles at the outermost boundary: they keep a real job table, run
each job's script as a process and parse the command lines as PBS Pro does. NATS, the scaler, the
router and the ``first worker`` each job runs are real.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import orjson
import pytest

from services.scaler.providers.pbs import PbsProvider
from services.scaler.service import Scaler
from shared import config as cfg
from tests.support import ROOT, eventually

STANDINS = ROOT / "tests" / "doubles" / "pbs"


class Recording(PbsProvider):
    """The real PBS provider; every (node, state, reason) its poll reported is kept, with the model."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.reported: list[tuple[str, str, str]] = []
        self.model_of: dict[str, str] = {}

    async def start_node(self, spec):
        await super().start_node(spec)
        self.model_of[spec.node_id] = spec.model

    async def poll(self):
        states = await super().poll()
        for node_id, (state, reason) in states.items():
            if (node_id, state, reason) not in self.reported:
                self.reported.append((node_id, state, reason))
        return states

    def nodes(self, model: str, state: str) -> list[tuple[str, str]]:
        return [(n, r) for n, s, r in self.reported if s == state and self.model_of.get(n) == model]


@pytest.fixture
def pbs(monkeypatch, tmp_path) -> Path:
    """The stand-ins first on PATH, their job table in the test's folder; every job ended at the end."""
    table = tmp_path / "pbs"
    monkeypatch.setenv("PATH", f"{STANDINS}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PBS_STANDIN_DIR", str(table))
    yield table
    for job in (table / "jobs").glob("*.json"):
        state = json.loads(job.read_text())
        if state.get("job_state") == "R":
            os.system(f"{STANDINS / 'qdel'} {job.stem} 2>/dev/null")


def jobs(table: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((table / "jobs").glob("*.json"))}


async def start(
    services, tmp_path: Path, pbs_table: str, *, start_timeout_s: float = 60
) -> tuple[Recording, cfg.Config]:
    path = tmp_path / "first.toml"
    path.write_text(f"""
[nats]
subject_prefix = "{services.subjects.prefix}"
[scaler]
tick_s = 0.1
start_timeout_s = {start_timeout_s}
[worker]
heartbeat_s = 0.2
drain_timeout_s = 2
[[clusters]]
name = "polaris"
provider = "pbs"
max_nodes = 2
walltime_s = 3600
[clusters.pbs]
{pbs_table}
work_dir = "{tmp_path / "jobs"}"
poll_interval_s = 0.3
cancel_grace_s = 1
[[models]]
id = "cold"
capacity = 2
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 1 }}
scaling = {{ min_hot = 0, max_workers = 1, idle_s = 1.5 }}
[[models]]
id = "hot"
capacity = 2
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 1 }}
scaling = {{ min_hot = 1, max_workers = 1 }}
""")
    config = cfg.load_config(path)
    provider = Recording(config.cluster("polaris").pbs, config_path=str(path), nats_url=services.nats_url)
    await services.router(config)
    await services.stack.enter_async_context(
        Scaler(await services.connect(), services.subjects, config, {"polaris": provider})
    )
    return provider, config


def chat(model: str) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


@pytest.mark.slow
async def test_pbs_jobs_serve_a_burst_are_released_when_idle_and_replaced_after_a_qdel(
    pbs, services, tmp_path
):
    table = 'queue = "debug"\naccount = "FIRST"\nncpus = 64\nngpus = 4\nselect_extra = "system=polaris"\nfilesystems = "home:eagle"\nplace = "scatter"'
    provider, _ = await start(services, tmp_path, table)
    client = await services.client(request_timeout_s=60)
    burst = [asyncio.create_task(client.complete("cold", "chat", chat("cold"))) for _ in range(3)]
    assert all(r.texts[0] for r in await asyncio.wait_for(asyncio.gather(*burst), 45))

    ((cold_node, _),) = await eventually(lambda: provider.nodes("cold", "running"), what="the running report")
    cold_job = next(j for j in jobs(pbs).values() if j["Job_Name"] == f"first-{cold_node}")
    script = cold_job["argv"][-1]
    assert cold_job["argv"] == [
        "qsub", "-N", f"first-{cold_node}", "-j", "oe", "-o", str(tmp_path / "jobs" / f"{cold_node}.out"),
        "-l", "select=1:ncpus=64:ngpus=4:system=polaris", "-l", "walltime=01:00:00",
        "-l", "filesystems=home:eagle", "-l", "place=scatter", "-q", "debug", "-A", "FIRST", script,
    ]  # fmt: skip
    assert "--walltime 3600" in await asyncio.to_thread(Path(script).read_text)
    detail = provider.details()[cold_node]
    assert detail["host"] == "standin-node" and detail["walltime"] == 3600 and detail["nodes_reserved"] == 1

    # Idle: released; its workers drain and exit, so the job finishes cleanly.
    await eventually(lambda: provider.nodes("cold", "stopped"), timeout=20, what="the idle node released")
    (cold_job,) = [j for j in jobs(pbs).values() if j["Job_Name"] == f"first-{cold_node}"]
    assert (cold_job["job_state"], cold_job["Exit_status"]) == ("F", 0)

    # An operator deletes the hot model's job: reported with PBS's words, and replaced.
    (hot_id,) = [k for k, j in jobs(pbs).items() if j["job_state"] == "R"]
    await asyncio.to_thread(os.system, f"{STANDINS / 'qdel'} {hot_id}")
    failed = await eventually(
        lambda: provider.nodes("hot", "failed"), timeout=20, what="the deleted job reported"
    )
    assert (
        failed[0][1] == "finished: the job was terminated (qdel, or PBS ended it) (Job run and finished)"
    ), failed
    await eventually(
        lambda: [k for k, j in jobs(pbs).items() if j["job_state"] == "R" and k != hot_id],
        timeout=20,
        what="a replacement job running",
    )
    assert (await asyncio.wait_for(client.complete("hot", "chat", chat("hot")), 45)).texts[0]


async def test_a_pbs_job_that_cannot_get_its_gpus_waits_with_the_schedulers_comment_and_is_deleted(
    pbs, services, tmp_path
):
    provider, _ = await start(services, tmp_path, "ngpus = 8", start_timeout_s=1.5)
    queued = await eventually(lambda: provider.nodes("hot", "requested"), what="the queued job")
    await eventually(
        lambda: any(
            "Insufficient amount of resource: ngpus (R: 8 A: 4 T: 4)" in r
            for _, r in provider.nodes("hot", "requested")
        ),
        what="the scheduler's comment as the reason",
    )
    node = queued[0][0]
    await eventually(
        lambda: node in [n for n, _ in provider.nodes("hot", "stopped")], timeout=15, what="the release"
    )
    (job,) = [j for j in jobs(pbs).values() if j["Job_Name"] == f"first-{node}"]
    assert job["job_state"] == "F" and job["comment"] == "Job deleted by qdel while queued"


async def test_qsub_refuses_what_pbs_pro_refuses(pbs, tmp_path):
    from services.scaler.providers.base import NodeSpec
    from services.scaler.providers.scheduler_cli import SchedulerError
    from shared.provider_config import PbsSettings

    provider = PbsProvider(
        PbsSettings(filesystems="home:Eagle!", work_dir=str(tmp_path)),
        config_path="c.toml",
        nats_url="nats://x",
    )
    with pytest.raises(
        SchedulerError, match=r"Illegal attribute or resource value Resource_List\.filesystems"
    ):
        await provider.start_node(NodeSpec("polaris-x", "m", "polaris", workers=("polaris-n0",)))
    assert await provider.poll() == {}
