"""A Slurm job that reaches its time limit, on a real single-node Slurm (tests/slurm_fixture.py).

Slurm, NATS, the scaler, the router and the ``first worker`` in each job are all real, as in
test_slurm.py (whose helpers this reuses). Slurm's smallest limit is one minute, and slurmctld
looks for jobs past their limit only every 30 s from its own start (PERIODIC_TIMEOUT, compiled in,
no setting; OverTimeLimit is left at 0 and KillWait does not matter, as the worker exits on the
SIGTERM at once). With this module's fresh controller the job starts a few seconds after it, so
the kill comes at the controller's 90th second: this test takes about 90 s, and no less can do.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from services.scaler.service import Scaler
from shared import config as cfg
from shared import schema
from tests.integration.test_events import collect
from tests.integration.test_slurm import Recording, chat, jobs, write_config
from tests.slurm_fixture import SlurmCluster, slurm  # noqa: F401 (the fixture)
from tests.support import eventually

pytestmark = pytest.mark.slow

# The provider's words, then Slurm's reason (squeue %r).
TIMEOUT_REASON = "TIMEOUT: the job reached its time limit (TimeLimit)"


def slurm_state(cluster: SlurmCluster, job_id: str) -> str:
    """Slurm's own word for a job, ended ones included (squeue keeps them for MinJobAge)."""
    return cluster.run(
        "squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T"
    ).stdout.strip()


async def test_a_job_slurm_kills_at_its_time_limit_is_reported_as_timeout_and_replaced_while_requests_keep_coming(
    slurm: SlurmCluster,  # noqa: F811
    monkeypatch,
    services,
    nc,
    tmp_path,
):
    """The one-minute limit is the site's (an ``#SBATCH --time`` in extra_directives, as a
    partition's DefaultTime would be), so the worker is not told a walltime and does not drain
    before it: Slurm ends the job. With ``[clusters] walltime_s`` instead, the worker drains at
    the limit (walltime_margin_s cannot be negative), which is before Slurm's 30-s check comes
    round, and the job ends COMPLETED, not TIMEOUT. One node at most: the replacement can only
    be the scaler's answer to the failure, for the requests still coming."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    text = write_config(tmp_path, services.subjects.prefix).read_text()
    text = text.replace("tick_s = 0.1", "tick_s = 0.1\nbackoff_s = 0.5").replace(
        "max_nodes = 2", "max_nodes = 1"
    )
    text = text.replace("[clusters.slurm]", '[clusters.slurm]\nextra_directives = ["--time=1"]')
    text = text.replace(
        "scaling = { min_hot = 1, max_workers = 1 }", "scaling = { min_hot = 0, max_workers = 1 }"
    )
    path = tmp_path / "timeout.toml"
    path.write_text(text)
    config = cfg.load_config(path)
    assert config.cluster("hpc").walltime_s is None
    provider = Recording(config.cluster("hpc").slurm, config_path=str(path), nats_url=services.nats_url)
    node_events = await collect(nc, services.subjects.node_events)
    await services.router(config)
    await services.stack.enter_async_context(
        Scaler(await services.connect(), services.subjects, config, {"hpc": provider})
    )
    client = await services.client(request_timeout_s=60)
    answered: list[float] = []  # when each request was answered (unix s)
    refused: list[BaseException] = []

    async def keep_asking() -> None:
        """One user, a request every 0.2 s: demand never stops."""
        while True:
            try:
                result = await asyncio.wait_for(client.complete("cold", "chat", chat("cold")), 60)
                assert result.texts[0]
                answered.append(time.time())
            except Exception as exc:  # counted, asserted below
                refused.append(exc)
            await asyncio.sleep(0.2)  # pacing the load, not waiting for a state

    asker = asyncio.create_task(keep_asking())
    try:
        ((first, _),) = await eventually(
            lambda: provider.nodes("cold", "running"), timeout=30, what="the job"
        )
        first_job = provider.details()[first]["job_id"]
        assert provider.details()[first]["walltime"] == 60.0  # Slurm's limit, seen by squeue
        script = next((tmp_path / "jobs").glob(f"{first}-*.sh")).read_text()
        assert "#SBATCH --time=1" in script and "--walltime" not in script

        def failed() -> list[schema.Event]:
            return [e for e in node_events if e.name == "failed" and e.node_id == first]

        (event,) = await eventually(failed, timeout=110, interval=0.2, what="the time limit's kill reported")
        reported = time.time()
        assert event.reason == TIMEOUT_REASON and event.data["job_id"] == first_job, event
        assert [r for _, r in provider.nodes("cold", "failed")] == [event.reason]
        assert await asyncio.to_thread(slurm_state, slurm, first_job) == "TIMEOUT"

        # The requests still coming get a new job, which serves them.
        def replacement() -> list[schema.Event]:
            return [e for e in node_events if e.name == "running" and e.node_id != first]

        (running,) = await eventually(replacement, timeout=20, what="a replacement node running")
        second_job, state = (await asyncio.to_thread(jobs, slurm))[f"first-{running.node_id}"]
        assert second_job != first_job and state == "RUNNING"
        await eventually(
            lambda: [t for t in answered if t > reported + 1], timeout=20, what="answers from it"
        )
        assert not refused, refused[:3]
    finally:
        asker.cancel()
        await asyncio.gather(asker, return_exceptions=True)
        slurm.run("scancel", "--user=root")
