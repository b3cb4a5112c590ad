"""A scaler that dies, as a real ``first scaler`` process with the local provider's real worker
processes: its nodes keep serving, and the scaler that comes next (restarted, or a standby that
held back) adopts them from the node table in JetStream KV and releases them as usual, without
starting a node twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from shared import natsauth
from shared.nodes import read_nodes
from tests.processes import chat_body
from tests.support import eventually

pytestmark = [pytest.mark.faults, pytest.mark.slow]

LEASE_TTL_S = 1.5
SCALER = {"tick_s": 0.1, "lease_ttl_s": LEASE_TTL_S}
SIM = {"kind": "sim", "ttft_ms": 1, "itl_ms": 1}


async def nodes(fleet) -> list:
    return await read_nodes(fleet.nc.jetstream(), natsauth.scaler_bucket(fleet.config))


def pids_of(entry) -> list[int]:
    return [int(p) for p in entry.job_id.split(",") if p]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def workers_of(fleet) -> list[int]:
    """Every live process started with this fleet's config but not by the test itself: the
    scalers' worker processes, which outlive their scaler on purpose."""
    ours = {p.pid for p in fleet.procs if p.proc is not None}
    needle = str(fleet.config_path.resolve()).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if needle in argv and b"worker" in argv and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.fixture
async def strays(fleet):
    """Kill the worker processes the scalers left (the fleet kills only what it started)."""
    yield
    for pid in workers_of(fleet):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("per_node", [1, 2])
async def test_a_killed_scaler_leaves_its_nodes_serving_and_the_next_adopts_and_releases_them(
    fleet, strays, per_node
):
    """With one worker process per node, and with two (the local provider runs one process per
    worker, and adopts the node by both process ids)."""
    scaling = {"max_workers": per_node, "idle_s": 3, "workers_per_node": per_node}
    fleet.configure([{"id": "m", "engine": SIM, "clusters": ["a"], "scaling": scaling}], scaler=SCALER)
    await fleet.router()
    first = await fleet.first("scaler", "scaler")
    client = await fleet.client(request_timeout_s=60)

    cold = await client.complete("m", "chat", chat_body("m", max_tokens=2))  # starts a node
    [entry] = await eventually(lambda: _running(fleet), what="the node in the table")
    assert cold.worker_id in entry.workers and len(entry.workers) == per_node and entry.state == "running"
    pids = pids_of(entry)
    assert len(pids) == per_node and all(alive(p) for p in pids)

    first.kill()
    await first.wait()
    again = await client.complete("m", "chat", chat_body("m", max_tokens=2))
    assert again.worker_id in entry.workers, "the node stopped serving when its scaler died"
    assert all(alive(p) for p in pids)

    second = await fleet.first("scaler2", "scaler")
    acting = await eventually(
        lambda: second.events("scaler_acting"), timeout=LEASE_TTL_S + 15, what="takeover"
    )
    assert acting[0]["adopted"] == [entry.node_id] and acting[0]["dropped"] == []

    # Idle for idle_s: the new scaler releases the node it adopted; its worker drains and exits.
    await eventually(lambda: not any(alive(p) for p in pids), timeout=30, what="the adopted worker to exit")
    await eventually(lambda: _none_left(fleet), timeout=10, what="the node's entry to go")
    assert [e["node_id"] for e in second.events("node_release")] == [entry.node_id]
    assert second.events("node_request") == [], "the new scaler started a node of its own"
    assert workers_of(fleet) == []


async def test_a_standby_takes_over_within_seconds_without_starting_a_node_twice(fleet, strays):
    fleet.configure(
        [{"id": "m", "engine": SIM, "clusters": ["a"], "scaling": {"min_hot": 1, "max_workers": 2}}],
        scaler=SCALER,
    )
    first = await fleet.first("scaler-a", "scaler")
    await eventually(lambda: first.events("scaler_acting"), timeout=20, what="the first scaler to act")
    standby = await fleet.first("scaler-b", "scaler")
    await eventually(lambda: standby.events("scaler_started"), timeout=20, what="the standby to start")
    [entry] = await eventually(lambda: _running(fleet), timeout=30, what="the hot node")
    await eventually(
        lambda: any(b.state == "ready" for _, b in fleet.bus.beats_of(entry.workers[0])),
        timeout=30,
        what="the hot worker to be ready",
    )
    assert standby.events("scaler_acting") == [], "two scalers acted at once"

    killed_at = first.kill()
    await eventually(lambda: standby.events("scaler_acting"), timeout=LEASE_TTL_S + 10, what="the takeover")
    took = time.monotonic() - killed_at
    assert took < LEASE_TTL_S + 2.0, f"the standby took {took:.1f} s to take over"
    assert standby.events("scaler_acting")[0]["adopted"] == [entry.node_id]

    settle_until = time.monotonic() + 2.0  # twenty ticks of the new scaler
    await eventually(lambda: time.monotonic() > settle_until, timeout=5, what="a few ticks")
    assert [e.node_id for e in await nodes(fleet)] == [entry.node_id]
    assert standby.events("node_request") == []
    assert sorted(workers_of(fleet)) == sorted(pids_of(entry))


async def _running(fleet) -> list:
    found = await nodes(fleet)
    return found if found and all(e.state == "running" and e.job_id for e in found) else []


async def _none_left(fleet) -> bool:
    return not await nodes(fleet)
