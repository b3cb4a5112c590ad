"""The Slurm provider against a real single-node Slurm (tests/slurm_fixture.py).

Slurm, NATS, the scaler, the router and the ``first worker`` each job runs are all real: the job's
batch script is the provider's own, and the worker in it serves the sim engine. ``Recording``
only keeps what the provider's ``poll`` told the scaler, so the test can read the reasons.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from services.scaler.providers.factory import build_batch_or_globus
from services.scaler.providers.slurm import SlurmProvider
from services.scaler.service import Scaler
from shared import config as cfg
from shared import schema
from tests.slurm_fixture import SlurmCluster, slurm  # noqa: F401 (the fixture)
from tests.support import eventually

pytestmark = pytest.mark.slow


class Recording(SlurmProvider):
    """The real Slurm provider; every (node, state, reason) its poll reported is kept."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.reported: list[tuple[str, str, str]] = []
        self.model_of: dict[str, str] = {}

    async def start_node(self, spec):
        await super().start_node(spec)
        self.model_of[spec.node_id] = spec.model

    def nodes(self, model: str, state: str) -> list[tuple[str, str]]:
        """(node, reason) of each report of that state for the model's nodes."""
        return [(n, r) for n, s, r in self.reported if s == state and self.model_of.get(n) == model]

    async def poll(self):
        states = await super().poll()
        for node_id, (state, reason) in states.items():
            if (node_id, state, reason) not in self.reported:
                self.reported.append((node_id, state, reason))
        return states


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
name = "hpc"
provider = "slurm"
max_nodes = 2
[clusters.slurm]
work_dir = "{tmp / "jobs"}"
poll_interval_s = 0.3
cancel_grace_s = 1
command_timeout_s = 10
setup = ["export FIRST_TEST_SETUP=1"]
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
    return path


def chat(model: str) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def jobs(cluster: SlurmCluster) -> dict[str, tuple[str, str]]:
    """Slurm's own view: job name -> (job id, state), for jobs still pending or running."""
    out = cluster.run("squeue", "--noheader", "--states=pending,running", "--format=%j|%i|%T").stdout
    return {name: (job_id, state) for name, job_id, state in (line.split("|") for line in out.split())}


async def test_slurm_jobs_serve_a_cold_burst_are_released_when_idle_and_replaced_when_killed(
    slurm: SlurmCluster,  # noqa: F811
    monkeypatch,  # before services: SLURM_CONF stays set until the scaler has cancelled its jobs
    services,
    tmp_path,
):
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))  # the provider's sbatch/squeue/scancel find it
    config_path = write_config(tmp_path, services.subjects.prefix)
    config = cfg.load_config(config_path)
    cluster_cfg = config.cluster("hpc")
    provider = Recording(cluster_cfg.slurm, config_path=str(config_path), nats_url=services.nats_url)
    assert (
        type(build_batch_or_globus(cluster_cfg, config_path="c", nats_url="n", credentials_dir=""))
        is SlurmProvider
    )
    await services.router(config)
    scaler = Scaler(await services.connect(), services.subjects, config, {"hpc": provider})
    await services.stack.enter_async_context(scaler)
    client = await services.client(request_timeout_s=60)
    try:
        # The hot model's job starts without demand; a burst for the cold model submits one job.
        burst = [asyncio.create_task(client.complete("cold", "chat", chat("cold"))) for _ in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*burst), 45)
        assert all(r.texts[0] for r in results)
        await eventually(
            lambda: [s for _, s in jobs(slurm).values()] == ["RUNNING", "RUNNING"],
            what="both models' jobs running in Slurm, one each",
        )
        script = next((tmp_path / "jobs").glob("*.sh")).read_text()
        assert "#SBATCH --job-name=first-" in script and "export FIRST_TEST_SETUP=1" in script
        ((cold_node, _),) = await eventually(
            lambda: provider.nodes("cold", "running"), what="the running report"
        )

        # Idle for idle_s: the cold node is released and its job leaves Slurm's queue.
        def cold_job_gone():
            return all(not name.endswith(cold_node) for name in jobs(slurm))

        await eventually(cold_job_gone, timeout=20, what="the idle cold job to end in Slurm")
        await eventually(lambda: provider.nodes("cold", "stopped"), what="the released node reported stopped")

        # Someone cancels the hot model's job: the reason is reported, and min_hot starts another.
        ((hot_job, _),) = [v for name, v in jobs(slurm).items()]
        slurm.run("scancel", hot_job)
        killed = await eventually(lambda: provider.nodes("hot", "failed"), timeout=20, what="the failure")
        assert killed[0][1] == "CANCELLED: the job was cancelled (scancel)", killed
        await eventually(
            lambda: [j for j, _ in jobs(slurm).values() if j != hot_job],
            timeout=20,
            what="a replacement job",
        )
        answer = await asyncio.wait_for(client.complete("hot", "chat", chat("hot")), 45)
        assert answer.texts[0]
        assert [s for j, s in jobs(slurm).values() if j != hot_job] == ["RUNNING"]
    finally:
        slurm.run("scancel", "--user=root")


async def test_a_job_stuck_pending_shows_why_and_is_cancelled_after_the_start_timeout(
    slurm: SlurmCluster,  # noqa: F811
    monkeypatch,
    services,
    tmp_path,
):
    """--begin holds the job in the queue (Reason BeginTime), as a full queue would."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    text = write_config(tmp_path, services.subjects.prefix).read_text()
    text = text.replace("start_timeout_s = 60", "start_timeout_s = 2")
    text = text.replace("[clusters.slurm]", '[clusters.slurm]\nextra_directives = ["--begin=now+1hour"]')
    path = tmp_path / "stuck.toml"
    path.write_text(text)
    config = cfg.load_config(path)
    provider = Recording(config.cluster("hpc").slurm, config_path=str(path), nats_url=services.nats_url)
    await services.router(config)
    await services.stack.enter_async_context(
        Scaler(await services.connect(), services.subjects, config, {"hpc": provider})
    )
    queued = await eventually(
        lambda: [n for n, r in provider.nodes("hot", "requested") if r == "PENDING: BeginTime"],
        what="the job queued, with Slurm's reason",
    )
    first = queued[0]
    details = provider.details()[first]
    assert details["job_state"] == "PENDING" and details["estimated_start"] > time.time() + 3000, details
    await eventually(
        lambda: first in [n for n, _ in provider.nodes("hot", "stopped")],
        timeout=15,
        what="the stuck job released",
    )
    assert not [n for n, (j, _) in jobs(slurm).items() if n.endswith(first)], "its job is still in Slurm"


async def test_a_refused_submission_raises_with_sbatchs_words(slurm: SlurmCluster, monkeypatch, tmp_path):  # noqa: F811
    from services.scaler.providers.base import NodeSpec
    from services.scaler.providers.scheduler_cli import SchedulerError
    from shared.provider_config import SlurmSettings

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    provider = SlurmProvider(
        SlurmSettings(partition="nosuch", work_dir=str(tmp_path)), config_path="c.toml", nats_url="nats://x"
    )
    with pytest.raises(SchedulerError) as err:
        await provider.start_node(NodeSpec("hpc-x", "m", "hpc", workers=("hpc-n0",)))
    assert "sbatch" in str(err.value) and "invalid partition" in str(err.value).lower()
    assert await provider.poll() == {}


async def test_a_restarted_scaler_adopts_its_running_slurm_job_instead_of_submitting_another(
    slurm: SlurmCluster,  # noqa: F811
    monkeypatch,
    services,
    tmp_path,
):
    """The first scaler stops leaving its nodes (as a crash would); the next, with a fresh
    provider, tracks the same Slurm job from the job id in the node table."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    config_path = write_config(tmp_path, services.subjects.prefix)
    config = cfg.load_config(config_path)
    await services.router(config)
    client = await services.client(request_timeout_s=60)

    first = Recording(config.cluster("hpc").slurm, config_path=str(config_path), nats_url=services.nats_url)
    async with Scaler(
        await services.connect(), services.subjects, config, {"hpc": first}, release_on_stop=False
    ):
        assert (await asyncio.wait_for(client.complete("hot", "chat", chat("hot")), 45)).texts[0]
    ((node, _),) = first.nodes("hot", "running")
    (job_id,) = [j for j, _ in jobs(slurm).values()]

    second = Recording(config.cluster("hpc").slurm, config_path=str(config_path), nats_url=services.nats_url)
    async with Scaler(await services.connect(), services.subjects, config, {"hpc": second}):
        await eventually(
            lambda: second.details().get(node, {}).get("job_state") == "RUNNING", what="the adoption"
        )
        assert second.details()[node]["job_id"] == job_id
        assert (await asyncio.wait_for(client.complete("hot", "chat", chat("hot")), 45)).texts[0]
        assert [j for j, _ in jobs(slurm).values()] == [job_id] and not second.model_of, "a second job"
    await eventually(lambda: not jobs(slurm), what="the orderly stop to cancel the adopted job")


async def test_a_crashing_worker_fails_its_job_and_sacct_tells_the_same_once_squeue_forgets(
    slurm: SlurmCluster,  # noqa: F811
    monkeypatch,
    tmp_path,
):
    """The provider alone: a node whose worker exits 1 at once is a FAILED job; sacct (here from
    the job completion log, --completion) says so for jobs past squeue's MinJobAge."""
    from services.scaler.providers.base import NodeSpec
    from shared.provider_config import SlurmSettings

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    settings = SlurmSettings(
        first_command="/bin/false", work_dir=str(tmp_path), poll_interval_s=0.2, sacct_args=["--completion"]
    )
    provider = SlurmProvider(settings, config_path="c.toml", nats_url="nats://127.0.0.1:1")
    await provider.start_node(NodeSpec("hpc-crash", "m", "hpc", workers=("hpc-n0",)))
    (job_id,) = [d["job_id"] for d in provider.details().values()]
    reports: list = []

    async def failed():
        reports.append(await provider.poll())
        return reports[-1].get("hpc-crash", ("", ""))[0] == "failed"

    await eventually(failed, timeout=15, what="the crashed job's failure")
    assert reports[-1]["hpc-crash"] == ("failed", "FAILED: a worker exited with an error (NonZeroExitCode)")
    accounted = await provider._sacct([job_id])
    assert (accounted[job_id].phase, accounted[job_id].state, accounted[job_id].failed) == (
        "ended",
        "FAILED",
        True,
    )


async def test_a_failing_squeue_is_raised_once_per_interval_not_every_tick(
    slurm: SlurmCluster,  # noqa: F811
    monkeypatch,
    tmp_path,
):
    """The scaler reports a provider whose poll raises and backs the cluster off; between
    queries, poll answers from what it last knew."""
    from services.scaler.providers.base import NodeSpec
    from services.scaler.providers.scheduler_cli import SchedulerError
    from shared.provider_config import SlurmSettings

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    sleeper = tmp_path / "sleeper"  # a "first" that stays up without NATS
    sleeper.write_text("#!/bin/sh\nsleep 30\n")
    sleeper.chmod(0o755)
    settings = SlurmSettings(
        first_command=str(sleeper), work_dir=str(tmp_path), poll_interval_s=1.0, command_timeout_s=2
    )
    provider = SlurmProvider(settings, config_path="c.toml", nats_url="nats://127.0.0.1:1")
    await provider.start_node(NodeSpec("hpc-q", "m", "hpc", workers=("hpc-n0",)))
    await eventually(lambda: _running(provider, "hpc-q"), timeout=15, what="the job to run")

    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))  # slurmctld unreachable
    await asyncio.sleep(1.0)  # the next query is due
    with pytest.raises(SchedulerError, match=r"^squeue: (exited with status|no answer within 2 s)"):
        await provider.poll()
    assert await provider.poll() == {"hpc-q": ("running", "")}, "queried again at once"
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    await provider.close()


async def _running(provider, node: str) -> bool:
    return (await provider.poll()).get(node, ("",))[0] == "running"


async def test_one_slurm_job_runs_a_nodes_two_workers_each_with_its_own_gpu_and_ends_when_released(
    slurm: SlurmCluster,  # noqa: F811
    monkeypatch,
    services,
    nc,
    tmp_path,
):
    """workers_per_node = 2: one job, two `first worker` processes (CUDA_VISIBLE_DEVICES 0 and 1),
    both ready under the node's id; released whole, the job ends cleanly."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    text = write_config(tmp_path, services.subjects.prefix).read_text()
    text = text.replace("max_nodes = 2", "max_nodes = 4").replace(
        "[clusters.slurm]", "[clusters.slurm]\ngpus_per_worker = 1"
    )
    text = text.replace(
        "scaling = { min_hot = 1, max_workers = 1 }", "scaling = { min_hot = 0, max_workers = 1 }"
    )
    text = text.replace(
        "scaling = { min_hot = 0, max_workers = 1, idle_s = 1.5 }",
        "scaling = { min_hot = 0, max_workers = 2, idle_s = 1.5, workers_per_node = 2 }",
    )
    path = tmp_path / "pair.toml"
    path.write_text(text)
    config = cfg.load_config(path)
    ready: dict[str, str] = {}  # worker -> node

    async def on_beat(msg):
        beat = schema.heartbeat_decoder.decode(msg.data)
        if beat.state == "ready":
            ready[beat.worker_id] = beat.node_id

    await nc.subscribe(services.subjects.heartbeat_all, cb=on_beat)
    provider = Recording(config.cluster("hpc").slurm, config_path=str(path), nats_url=services.nats_url)
    await services.router(config)
    await services.stack.enter_async_context(
        Scaler(await services.connect(), services.subjects, config, {"hpc": provider})
    )
    client = await services.client(request_timeout_s=60)
    assert (await asyncio.wait_for(client.complete("cold", "chat", chat("cold")), 45)).texts[0]
    await eventually(lambda: len(ready) == 2, timeout=20, what="both workers of the node ready")
    ((node, _),) = provider.nodes("cold", "running")
    assert set(ready.values()) == {node} and len(jobs(slurm)) == 1
    script = next((tmp_path / "jobs").glob(f"{node}-*.sh")).read_text()
    assert "CUDA_VISIBLE_DEVICES=0 " in script and "CUDA_VISIBLE_DEVICES=1 " in script

    await eventually(lambda: provider.nodes("cold", "stopped"), timeout=20, what="the idle node released")
    assert provider.nodes("cold", "stopped")[0][1] == "COMPLETED: the job's workers exited"
    assert not jobs(slurm)


async def test_a_released_job_whose_workers_stay_is_cancelled_after_the_grace_period(
    slurm: SlurmCluster,  # noqa: F811
    monkeypatch,
    tmp_path,
):
    """The provider alone, with a "worker" that ignores the drain request (a sleeper): the job
    keeps running for cancel_grace_s, then scancel ends it and the node is stopped."""
    from services.scaler.providers.base import NodeSpec
    from shared.provider_config import SlurmSettings

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    sleeper = tmp_path / "sleeper"
    sleeper.write_text("#!/bin/sh\nsleep 60\n")
    sleeper.chmod(0o755)
    settings = SlurmSettings(
        first_command=str(sleeper), work_dir=str(tmp_path), poll_interval_s=0.2, cancel_grace_s=1.5
    )
    provider = SlurmProvider(settings, config_path="c.toml", nats_url="nats://127.0.0.1:1")
    await provider.start_node(NodeSpec("hpc-g", "m", "hpc", workers=("hpc-n0",)))
    await eventually(lambda: _running(provider, "hpc-g"), timeout=15, what="the job to run")

    await provider.stop_node("hpc-g")
    released = time.monotonic()
    states = await eventually(provider.poll, timeout=15, what="a report")  # within the grace period
    assert states["hpc-g"][0] == "stopping" and [s for _, s in jobs(slurm).values()] == ["RUNNING"]

    async def stopped():
        state = (await provider.poll()).get("hpc-g", ("",))
        return state if state[0] != "stopping" else None

    final = await eventually(stopped, timeout=15, what="the cancelled job reported")
    assert final[0] == "stopped" and final[1].startswith("CANCELLED"), final
    assert time.monotonic() - released >= 1.5
