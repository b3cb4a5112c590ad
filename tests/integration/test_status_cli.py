"""``first status`` as an operator runs it (a child process) against a real router and sim workers
on the session's nats-server: the tables, the JSON, a worker going away, and no router at all."""

from __future__ import annotations

import asyncio
import sys

import orjson

from tests.integration.conftest import make_config
from tests.support import ROOT, eventually


async def first_status(tmp_path, nats_url: str, config_text: str, *args: str) -> tuple[int, str, str]:
    path = tmp_path / "first.toml"
    path.write_text(config_text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "status", "--config", str(path), "--nats", nats_url, *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_status_shows_models_clusters_and_a_worker_going_away(services, subjects, nats_url, tmp_path):
    text = f"""
[nats]
subject_prefix = "{subjects.prefix}"
[worker]
heartbeat_s = 0.2
[[clusters]]
name = "a"
max_nodes = 3
[[clusters]]
name = "b"
[[models]]
id = "m"
capacity = 4
engine = {{ kind = "sim" }}
"""
    config = make_config([{"id": "m", "capacity": 4}], nats={"subject_prefix": subjects.prefix})
    await services.router(config)
    worker = await services.worker(config, "m", cluster="a", worker_id="a-w1")
    await services.worker(config, "m", cluster="b", worker_id="b-w1")

    async def workers_shown() -> dict | None:
        code, out, err = await first_status(tmp_path, nats_url, text, "--json")
        assert code == 0, err
        view = orjson.loads(out)
        return view if view["models"][0]["workers"] == 2 else None

    view = await eventually(workers_shown, what="both workers in first status")
    assert view["models"] == [
        {
            "model": "m",
            "status": "live",
            "workers": 2,
            "slots_in_use": 0,
            "slots": 8,
            "queued": 0,
            "nodes_starting": 0,
        }
    ]
    assert {c["cluster"]: (c["workers"], c["max_nodes"]) for c in view["clusters"]} == {
        "a": (1, 3),
        "b": (1, 8),
    }

    code, table, err = await first_status(tmp_path, nats_url, text)
    assert code == 0 and err == ""
    lines = table.splitlines()
    assert lines[2].split() == ["MODEL", "STATUS", "WORKERS", "SLOTS", "QUEUED", "STARTING"]
    assert lines[3].split() == ["m", "live", "2", "0/8", "0", "0"]
    assert ["a", "1", "0/4", "1/3", "-"] in [line.split() for line in lines]

    await worker.stop()  # it drains and says so: routers forget it

    async def gone() -> bool:
        code, out, _ = await first_status(tmp_path, nats_url, text, "--json")
        clusters = {c["cluster"]: c["workers"] for c in orjson.loads(out)["clusters"]}
        return code == 0 and clusters == {"a": 0, "b": 1}

    await eventually(gone, what="the stopped worker to leave first status")


async def test_watch_refreshes_until_stopped(services, subjects, nats_url, tmp_path):
    """--watch: a JSON line per refresh; a worker that stops disappears from the next ones."""
    config = make_config([{"id": "m"}], nats={"subject_prefix": subjects.prefix})
    await services.router(config)
    worker = await services.worker(config, "m", cluster="a", worker_id="a-w1")
    path = tmp_path / "first.toml"
    path.write_text(f'[nats]\nsubject_prefix = "{subjects.prefix}"\n[[clusters]]\nname = "a"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "status", "--config", str(path), "--nats", nats_url,
        "--watch", "0.2", "--json", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:

        async def workers_now() -> int:
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            return orjson.loads(line)["clusters"][0]["workers"]

        async def count_is(n: int) -> bool:
            return await workers_now() == n

        await eventually(lambda: count_is(1), what="the worker in a refresh")
        await worker.stop()
        await eventually(lambda: count_is(0), what="a refresh without it")
    finally:
        proc.terminate()
        await proc.wait()


async def test_no_router_is_one_line_and_exit_2(subjects, nats_url, tmp_path):
    text = f'[nats]\nsubject_prefix = "{subjects.prefix}"\n'
    code, out, err = await first_status(tmp_path, nats_url, text)
    assert (code, out) == (2, "") and err.strip() == "first status: no router is running"


async def test_status_shows_the_scalers_nodes_with_their_job_and_reason(
    services, subjects, nats_url, tmp_path, nc
):
    from services.scaler.service import Scaler
    from tests.integration.test_scaler_table import TableProvider, demand

    text = f"""
[nats]
subject_prefix = "{subjects.prefix}"
[scaler]
tick_s = 0.05
[[clusters]]
name = "a"
walltime_s = 3600
[[models]]
id = "m"
engine = {{ kind = "sim" }}
"""
    config = make_config(
        [{"id": "m"}], nats={"subject_prefix": subjects.prefix}, scaler={"tick_s": 0.05},
        clusters=[{"name": "a", "walltime_s": 3600}],
    )  # fmt: skip
    await services.router(config)
    provider = TableProvider()
    await services.stack.enter_async_context(
        Scaler(await services.connect(), subjects, config, {"a": provider})
    )
    await demand(nc, subjects, "m", 1)
    [spec] = await eventually(lambda: provider.requested, what="a node request")
    provider.set(spec.node_id, "queued", "Resources")

    async def node_shown() -> list | None:
        code, out, err = await first_status(tmp_path, nats_url, text, "--json")
        assert code == 0, err
        shown = orjson.loads(out)["nodes"]
        return shown if shown and shown[0]["Job State"] == "QUEUED" else None

    [node] = await eventually(node_shown, what="the queued node in first status")
    assert node == {
        "Models": "m", "Framework": "sim", "Cluster": "a", "Model Status": "queued",
        "Job ID": f"job-{spec.node_id}", "Job State": "QUEUED", "Node ID": spec.node_id, "Workers": "a-n0",
        "Nodes Reserved": 1, "Job Comments": "Resources", "Walltime": "01:00:00",
    }  # fmt: skip
    code, table, _ = await first_status(tmp_path, nats_url, text)
    assert code == 0
    row = [
        spec.node_id,
        "m",
        "a",
        "queued",
        f"job-{spec.node_id}",
        "QUEUED",
        "-",
        "a-n0",
        "01:00:00",
        "Resources",
    ]
    assert row in [line.split() for line in table.splitlines()]
