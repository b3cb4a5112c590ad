"""The request path side by side: the same load straight to the engine, then through the stack to it.

The engine is ``tests.mock_engine`` (zero delay, raw asyncio), so what the stack adds is all there
is to see: latency, throughput, time to the first event, and the CPU its processes (``first up``:
gateway, router and scaler; the embedded nats-server; the worker) spend per request. The load
generator (``bench.loadgen``) and the mock each run in their own process, outside that count.

Scenarios, each direct and through the stack: whole answers with 1, 4, 16 and 64 clients (the
sweep of the plot), and 32 streams of 64 tokens.

Run: ``make bench-requestpath`` or ``.venv/bin/python -m bench.requestpath [--quick]
[--plot docs/requestpath.png] [--json out.json] [--profile /tmp/prof]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench import procstat, pyspy
from bench.report import plot, table, targets
from tests.support import ROOT, Stack

CONFIG = """
[nats]
url = ""
[[clusters]]
name = "bench"
[[models]]
id = "{model}"
capacity = 256
engine = {{ kind = "openai", url = "{engine_url}", served_model = "{served}" }}
scaling = {{ min_hot = 1, max_workers = 1 }}
"""
MODEL = "bench/mock"
SERVED = "mock"


@dataclass(frozen=True)
class Scenario:
    name: str
    clients: int
    stream: bool = False
    tokens: int = 16


SWEEP = tuple(Scenario(f"{c} client{'s' * (c > 1)}", c) for c in (1, 4, 16, 64))
STREAMS = Scenario("32 streams x 64", 32, stream=True, tokens=64)


def _label(p: procstat.Proc, root: int) -> str:
    if p.pid == root:
        return "first up"
    if " worker " in procstat.cmdline(p.pid):
        return "worker"
    return p.name


def _snapshot(stack_pid: int, others: dict[str, int]) -> dict:
    cpu = {name: procstat.process_cpu(pid) for name, pid in others.items()}
    for p in procstat.tree(stack_pid):
        label = _label(p, stack_pid)
        cpu[f"stack:{p.pid}:{label}"] = p.cpu_s
        cpu[f"sys:{p.pid}:{label}"] = p.sys_s
    busy, steal = procstat.machine_busy_s()
    return {"cpu": cpu, "machine": busy, "steal": steal, "at": time.monotonic()}


def _cpu_figures(before: dict, after: dict, requests: int) -> dict:
    """CPU ms per request: of the stack (in all, and by process), the mock, the load generator;
    ``other_cores``: what the rest of the machine used meanwhile, in cores (noise, ideally ~0);
    ``steal_cores``: what the hypervisor gave to other machines."""
    delta = {k: after["cpu"][k] - before["cpu"].get(k, 0.0) for k in after["cpu"]}
    seconds = after["at"] - before["at"]
    by_process: dict[str, float] = {}
    in_kernel = 0.0
    for key, value in delta.items():
        if key.startswith("stack:"):
            label = key.split(":", 2)[2]
            by_process[label] = by_process.get(label, 0.0) + value
        elif key.startswith("sys:"):
            in_kernel += value
    stack = sum(by_process.values())
    ours = stack + delta["mock"] + delta["loadgen"]
    per = 1000 / max(requests, 1)
    return {
        "stack_ms_per_req": stack * per,
        "stack_by_process_ms_per_req": {k: v * per for k, v in sorted(by_process.items())},
        "stack_cores": stack / seconds,
        "stack_sys_share": in_kernel / stack if stack else 0.0,
        "mock_ms_per_req": delta["mock"] * per,
        "loadgen_ms_per_req": delta["loadgen"] * per,
        "loadgen_cores": delta["loadgen"] / seconds,
        "other_cores": max(0.0, after["machine"] - before["machine"] - ours) / seconds,
        "steal_cores": (after["steal"] - before["steal"]) / seconds,
    }


async def drive(url: str, model: str, s: Scenario, args, stack_pid: int, mock_pid: int) -> dict:
    """One run of ``bench.loadgen`` in its own process, with the CPU counted around its measured part."""
    path = "/v1/completions"
    argv = [
        sys.executable, "-m", "bench.loadgen", "--url", url + path, "--model", model,
        "--clients", str(s.clients), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
        "--tokens", str(s.tokens), *(["--stream"] if s.stream else []),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        err = b""
        while (line := await proc.stderr.readline()) and line.strip() != b"measuring":
            err += line
        others = {"mock": mock_pid, "loadgen": proc.pid}
        before = await asyncio.to_thread(_snapshot, stack_pid, others)
        out = await proc.stdout.readline()
        after = await asyncio.to_thread(_snapshot, stack_pid, others)
        err += await proc.stderr.read()
        if await proc.wait() != 0 or not out:
            raise RuntimeError(f"bench.loadgen failed: {err.decode(errors='replace')[-2000:]}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    result = orjson.loads(out)
    result["cpu"] = _cpu_figures(before, after, result["requests"])
    return result


async def start_mock() -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.mock_engine", "--port", "0", "--model", SERVED,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        line = (await proc.stdout.readline()).decode()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"the mock engine did not start: {line!r}")
    return proc, line.split()[-1]


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def profile(stack: Stack, args, mock_pid: int) -> dict:
    """py-spy on ``first up`` and on the worker during a 64-client run, into ``args.profile``."""
    out = Path(args.profile)
    pids = {"first-up": stack.proc.pid}
    for p in procstat.tree(stack.proc.pid):
        if _label(p, stack.proc.pid) == "worker":
            pids["worker"] = p.pid
    seconds, rate = 10, 200
    load_args = argparse.Namespace(seconds=seconds + 2, warmup=1.0)
    load = asyncio.create_task(drive(stack.base_url, MODEL, SWEEP[-1], load_args, stack.proc.pid, mock_pid))
    await asyncio.sleep(1.5)  # past the warm-up
    records = (pyspy.record(pid, seconds, out / f"{name}.raw", rate) for name, pid in pids.items())
    await asyncio.gather(*records)
    result = await load
    return {"pids": pids, "seconds": seconds, "rate": rate, "req_per_s": result["req_per_s"]}


def summarise_profiles(folder: Path, run: dict) -> str:
    text = [
        f"py-spy, {run['seconds']} s at {run['rate']} Hz each, during 64 clients non-streaming through"
        f" the stack: {run['req_per_s']:.0f} req/s (slowed by the sampling)"
    ]
    for name, pid in run["pids"].items():
        raw = folder / f"{name}.raw"
        summary = pyspy.summarise(raw.read_text(), expected=run["seconds"] * run["rate"])
        (folder / f"{name}.top.txt").write_text(summary)
        text.append(f"\n== {name} (pid {pid}): {raw}\n{summary}")
    return "\n".join(text)


async def measure(args) -> tuple[list[dict], dict]:
    """Every scenario, direct then through one stack; then the profile if asked for."""
    runs: list[dict] = []
    profiled: dict = {}
    mock, engine_url = await start_mock()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = CONFIG.format(model=MODEL, engine_url=engine_url, served=SERVED)
            stack = await Stack(config, Path(tmp), name="requestpath").start(ready_models=[MODEL], timeout=90)
            try:
                for s in (*SWEEP, STREAMS):
                    for path, url, model in (
                        ("direct", engine_url, SERVED),
                        ("stack", stack.base_url, MODEL),
                    ):
                        result = await drive(url, model, s, args, stack.proc.pid, mock.pid)
                        runs.append({"scenario": s.name, "path": path, "clients": s.clients, **result})
                        print(f"  {s.name:<16} {path:<6} {result['req_per_s']:9.0f} req/s", file=sys.stderr)
                        if path == "stack" and (result["errors"] or not result["requests"]):
                            print(f"errors: {result['errors_by_status']}; the stack's log ends:\n"
                                  f"{stack.log_tail(20)}", file=sys.stderr)  # fmt: skip
                if args.profile:
                    profiled = await profile(stack, args, mock.pid)
            finally:
                await stack.stop()
    finally:
        await stop(mock)
    return runs, profiled


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs after 1 s of warm-up (about a minute)")
    parser.add_argument("--plot", help="write a PNG: p50 latency and req/s against clients")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--profile", help="also py-spy the stack's processes into this folder")
    args = parser.parse_args()
    args.seconds, args.warmup = (3.0, 1.0) if args.quick else (10.0, 2.0)
    if args.profile:
        pyspy.executable()  # fail now, not after the runs
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runs, profiled = asyncio.run(measure(args))
    meta = {"cores": os.cpu_count(), "seconds": args.seconds, "warmup": args.warmup,
            "wall_s": time.monotonic() - started, "python": sys.version.split()[0]}  # fmt: skip
    goals = targets(runs, SWEEP[0].name, SWEEP[-1].name, STREAMS.name)
    print(table(runs, goals, meta))
    if profiled:
        print("\n" + summarise_profiles(Path(args.profile), profiled))
    if args.json:
        document = {"meta": meta, "runs": runs, "targets": goals, "profile": profiled}
        Path(args.json).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    if args.plot:
        plot([r for r in runs if not r["stream"]], args.plot)


if __name__ == "__main__":
    main()
