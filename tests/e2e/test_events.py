"""Operator events under ``first up``: a cold start told in order in the event stream, read back
with ``first events tail`` as an operator runs it (a child process), live and filtered, and a
request that finds no worker in time reported as failed."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

import openai
import orjson
import pytest

from shared import events, schema
from tests.support import ROOT, eventually

MESSAGES = [{"role": "user", "content": "hello"}]


async def tail(sim_stack, nats_url: str, *args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "events", "tail", "--config", str(sim_stack.config_path),
        "--nats", nats_url, *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def order(seen: list[dict], model: str) -> list[str]:
    return [f"{e['kind']}.{e['name']}" for e in seen if e.get("model") == model]


def comes_in_order(names: list[str], chain: list[str]) -> bool:
    """``chain`` is a subsequence of ``names``, each at its first appearance."""
    firsts = [names.index(step) if step in names else -1 for step in chain]
    return -1 not in firsts and firsts == sorted(firsts)


async def test_a_cold_start_is_told_in_order_and_first_events_tail_reads_it_back(sim_stack, oai, nats_url):
    answer = await oai.chat.completions.create(model="sim/evented", messages=MESSAGES, max_tokens=2)
    assert answer.usage.completion_tokens == 2
    chain = [
        "request.held",
        "scale.up",
        "node.requested",
        "worker.starting",
        "worker.ready",
        "request.dispatched",
    ]

    async def told() -> list[dict] | None:
        code, out, err = await tail(sim_stack, nats_url, "--since", "5m", "--json", "--no-follow")
        assert code == 0, err
        seen = [orjson.loads(line) for line in out.splitlines()]
        return seen if "request.dispatched" in order(seen, "sim/evented") else None

    seen = await eventually(told, timeout=10, what="the dispatch after the cold start")
    names = order(seen, "sim/evented")
    assert comes_in_order(names, chain), names
    assert names.index("node.requested") < names.index("node.running")
    ready = next(e for e in seen if e.get("model") == "sim/evented" and e["name"] == "ready")
    assert (
        ready["cluster"] == "sophia"
        and ready["worker_id"] == ready["source"]
        and ready["data"]["engine"] == "sim"
    )
    assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)

    code, out, _ = await tail(
        sim_stack, nats_url, "--since", "5m", "--no-follow", "--kind", "node", "--cluster", "sophia"
    )
    assert code == 0
    lines = [line for line in out.splitlines() if "sim/evented" in line]
    assert lines and all("node." in line and "sophia" in line for line in lines), out
    assert "\x1b[" not in out  # no colours when stdout is not a terminal


async def test_first_events_tail_follows_live_keeps_its_kinds_and_skips_junk(
    sim_stack, first_client, nats_url
):
    s, nc = sim_stack.subjects, first_client.nc
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "events", "tail", "--config", str(sim_stack.config_path),
        "--nats", nats_url, "--since", "1s", "--kind", "worker", "--json",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        marker = f"w-{time.monotonic_ns()}"

        def event(kind: str, name: str) -> bytes:
            return events.encode(
                schema.Event(kind=kind, name=name, time=time.time(), source=marker, worker_id=marker)
            )

        async def next_line() -> dict:
            return orjson.loads(await asyncio.wait_for(proc.stdout.readline(), 10))

        # Until the tail is following, what is published may come before its start: send until seen.
        async def shown() -> bool:
            await nc.publish(s.event("worker", "ready", marker), event("worker", "ready"))
            with contextlib.suppress(TimeoutError):
                line = await asyncio.wait_for(proc.stdout.readline(), 0.5)
                return orjson.loads(line)["worker_id"] == marker
            return False

        await eventually(shown, timeout=20, what="the tail to show a live worker event")
        await nc.publish(s.event("worker", "draining", marker), b"\x00 not json")
        await nc.publish(s.event("node", "running", marker), event("node", "running"))
        await nc.publish(s.event("worker", "lost", marker), event("worker", "lost"))
        while (line := await next_line())["name"] == "ready":
            pass  # the extra probes
        assert (line["kind"], line["name"], line["worker_id"]) == ("worker", "lost", marker)
    finally:
        proc.kill()
        await proc.wait()


async def test_a_request_no_worker_takes_in_time_is_reported_failed(sim_stack, oai, nats_url):
    since = time.time()
    with pytest.raises(openai.APIStatusError) as refused:
        await oai.chat.completions.create(model="sim/never", messages=MESSAGES, max_tokens=2)
    assert refused.value.status_code in (429, 503)

    async def failed() -> dict | None:
        code, out, err = await tail(
            sim_stack, nats_url, "--since", "1m", "--json", "--no-follow", "--kind", "request"
        )
        assert code == 0, err
        seen = [orjson.loads(line) for line in out.splitlines()]
        return next(
            (
                e
                for e in seen
                if e["name"] == "failed" and e.get("model") == "sim/never" and e["time"] >= since
            ),
            None,
        )

    event = await eventually(failed, timeout=10, what="the request.failed event")
    assert "no worker" in event["reason"] and event["data"]["code"]


async def test_a_bad_since_or_a_missing_stream_is_one_line_and_status_2(sim_stack, nats_url, tmp_path):
    code, out, err = await tail(sim_stack, nats_url, "--since", "yesterday-ish", "--no-follow")
    assert code == 2 and err.startswith("first events: --since") and not out
    other = tmp_path / "other.toml"
    other.write_text('[nats]\nsubject_prefix = "nothing-here"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "events", "tail", "--config", str(other), "--nats", nats_url, "--no-follow",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err_b = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and "no event stream NOTHING-HERE_EVENTS" in err_b.decode(), err_b
    assert len(err_b.decode().strip().splitlines()) == 1


async def test_first_status_shows_the_newest_events(sim_stack, first_client, nats_url):
    marker = f"w-{time.monotonic_ns()}"
    event = schema.Event(
        kind="worker", name="lost", time=time.time(), source=marker, worker_id=marker, reason="gone"
    )
    await first_client.nc.publish(sim_stack.subjects.event("worker", "lost", marker), events.encode(event))

    async def status(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "status", "--config", str(sim_stack.config_path),
            "--nats", nats_url, *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        return out.decode()

    async def shown() -> dict | None:
        view = orjson.loads(await status("--json"))
        return next((e for e in view["events"] if e.get("worker_id") == marker), None)

    assert (await eventually(shown, what="the event in first status --json"))["reason"] == "gone"
    table = await status()
    assert "NEWEST EVENTS" in table and "worker.lost" in table and marker in table


async def test_ctrl_c_ends_the_tail_quietly(sim_stack, nats_url):
    import signal

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "events", "tail", "--config", str(sim_stack.config_path),
        "--nats", nats_url, "--since", "1m",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.wait_for(proc.stdout.readline(), 20)  # it is following
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()
