"""What the gateway's Prometheus metrics add to the request path: ``bench.requestpath``'s stack, A/B.

- ``off``: ``[metrics] gateway = false``: no /metrics, nothing observed (the handler still fills
  its small Outcome, which nothing reads).
- ``on``: the default: every inference request observed once at its end (counters, histograms),
  the time to the first chunk of a stream taken.

Each arm gets a fresh ``first up`` (embedded nats-server, gateway, router, scaler, one worker whose
``openai`` engine is the zero-delay ``tests.mock_engine``) per round; the arms alternate (off, on,
on, off, ...), and medians are compared. Rows: whole answers from 1 and 64 clients, and 32 streams
of 64 tokens. Columns as in requestpath: req/s, p50, and the stack's CPU ms per request from /proc
(compare this first: it moves least with the rest of the machine's load). Before the runs, the cost
of one observation in this process (``GatewayMetrics.observe``, timeit) is printed too: the
figure the A/B should agree with, without its noise.

Run: .venv/bin/python -m bench.metrics [--seconds 5] [--warmup 1] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import msgspec
import orjson

from bench import requestpath as rp
from services.gateway.metrics import GatewayMetrics, Outcome
from shared import config as cfg
from tests import support

ARMS = ("off", "on")
ROWS = (rp.SWEEP[0], rp.SWEEP[-1], rp.STREAMS)  # 1 and 64 clients whole, 32 streams x 64


def config_text(arm: str, engine_url: str) -> str:
    text = rp.CONFIG.format(model=rp.MODEL, engine_url=engine_url, served=rp.SERVED)
    return text + ("[metrics]\ngateway = false\n" if arm == "off" else "")


def observe_cost_us(n: int = 200_000) -> dict:
    """µs per ``observe`` of a whole answer and of a stream (with TTFT and ITL), in this process."""
    config = msgspec.toml.decode(config_text("on", "http://127.0.0.1:1").encode(), type=cfg.Config)
    metrics = GatewayMetrics(config, lambda: None)
    whole, stream = Outcome("completion"), Outcome("chat")
    for o in (whole, stream):
        o.cluster, o.prompt_tokens, o.completion_tokens = "bench", 12, 16
    stream.first_at = 1.0
    costs = {}
    for name, outcome in (("whole", whole), ("stream", stream)):
        seconds = min(
            timeit.repeat(lambda o=outcome: metrics.observe(o, rp.MODEL, 200, 0.5, 1.5), number=n, repeat=3)
        )
        costs[name] = seconds / n * 1e6
    return costs


async def one_arm(arm: str, folder: Path, engine_url: str, args, mock_pid: int) -> list[dict]:
    stack = support.Stack(config_text(arm, engine_url), folder, name=f"metrics-{arm}")
    await stack.start(ready_models=[rp.MODEL], timeout=90)
    runs = []
    try:
        for s in ROWS:
            r = await rp.drive(stack.base_url, rp.MODEL, s, args, stack.proc.pid, mock_pid)
            runs.append({"arm": arm, "row": s.name, **r})
            print(f"  {arm:<3} {s.name:<16} {r['req_per_s']:7.0f} req/s p50 {r['latency_ms']['p50']:.3f} ms,"
                  f" stack CPU {r['cpu']['stack_ms_per_req']:.3f} ms/req", file=sys.stderr)  # fmt: skip
            if r["errors"] or not r["requests"]:
                raise RuntimeError(f"{arm}: errors {r['errors_by_status']}\n{stack.log_tail(20)}")
    finally:
        await stack.stop()
    return runs


async def measure(args) -> list[dict]:
    runs = []
    mock, engine_url = await rp.start_mock()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
            for n in range(args.rounds):
                for arm in ARMS if n % 2 == 0 else ARMS[::-1]:
                    (folder := Path(tmp) / f"{arm}-{n}").mkdir()
                    runs += [dict(r, round=n) for r in await one_arm(arm, folder, engine_url, args, mock.pid)]
    finally:
        await rp.stop(mock)
    return runs


FIGURES = {
    "req_per_s": lambda r: r["req_per_s"],
    "p50_ms": lambda r: r["latency_ms"]["p50"],
    "cpu_ms": lambda r: r["cpu"]["stack_ms_per_req"],
    # The gateway's process (with the router and scaler): where the metrics' cost lands.
    "up_cpu_ms": lambda r: r["cpu"]["stack_by_process_ms_per_req"].get("first up", 0.0),
}


def _paired(mine: dict[str, list[dict]], figure) -> list[float]:
    """on/off of one figure, round by round: the arms of a round run back to back."""
    by_round: dict[int, dict[str, float]] = {}
    for arm, runs in mine.items():
        for r in runs:
            by_round.setdefault(r["round"], {})[arm] = figure(r)
    return sorted(v["on"] / v["off"] for v in by_round.values() if len(v) == 2 and v["off"])


def summarise(runs: list[dict]) -> list[dict]:
    """Per row: the medians of each arm, and on/off ratios (of the medians, and round by round)."""
    rows = []
    for s in ROWS:
        mine = {a: [r for r in runs if r["arm"] == a and r["row"] == s.name] for a in ARMS}
        row = {"row": s.name}
        for a in ARMS:
            for name, figure in FIGURES.items():
                row[f"{a}_{name}"] = statistics.median(figure(r) for r in mine[a])
        row["cpu_ratio"] = row["on_cpu_ms"] / row["off_cpu_ms"]
        row["up_cpu_ratio"] = row["on_up_cpu_ms"] / row["off_up_cpu_ms"]
        row["req_per_s_ratio"] = row["on_req_per_s"] / row["off_req_per_s"]
        row["added_p50_ms"] = row["on_p50_ms"] - row["off_p50_ms"]
        row["cpu_ratio_by_round"] = _paired(mine, FIGURES["cpu_ms"])
        row["up_cpu_ratio_by_round"] = _paired(mine, FIGURES["up_cpu_ms"])
        row["req_per_s_ratio_by_round"] = _paired(mine, FIGURES["req_per_s"])
        row["other_cores"] = statistics.median(r["cpu"]["other_cores"] for a in ARMS for r in mine[a])
        rows.append(row)
    return rows


def table(rows: list[dict], meta: dict) -> str:
    cost = meta["observe_us"]
    out = [
        f"gateway metrics, A/B: medians of {meta['rounds']} rounds per arm; {meta['seconds']:g} s per row"
        f" after {meta['warmup']:g} s of warm-up; {meta['cores']} cores shared",
        f"one observe() in-process: {cost['whole']:.2f} µs for a whole answer, {cost['stream']:.2f} µs for a stream",
        "CPU ms/req: the stack's processes (first up, nats-server, worker); 'first up': the gateway's process only",
        "",
        f"{'row':<16} {'req/s off':>9} {'on':>6} {'ratio':>6}  {'p50 ms off':>10} {'on':>6}  "
        f"{'CPU off':>7} {'on':>6} {'ratio':>6}  {'first up off':>12} {'on':>6} {'ratio':>6}  {'other load':>10}",
    ]
    for r in rows:
        out.append(
            f"{r['row']:<16} {r['off_req_per_s']:9.0f} {r['on_req_per_s']:6.0f} {r['req_per_s_ratio']:6.3f}"
            f"  {r['off_p50_ms']:10.2f} {r['on_p50_ms']:6.2f}  {r['off_cpu_ms']:7.3f} {r['on_cpu_ms']:6.3f}"
            f" {r['cpu_ratio']:6.3f}  {r['off_up_cpu_ms']:12.3f} {r['on_up_cpu_ms']:6.3f} {r['up_cpu_ratio']:6.3f}"
            f"  {r['other_cores']:10.2f}"
        )
    out.append("")
    for r in rows:
        rounds = ", ".join(f"{x:.3f}" for x in r["cpu_ratio_by_round"])
        up = ", ".join(f"{x:.3f}" for x in r["up_cpu_ratio_by_round"])
        out.append(f"{r['row']:<16} CPU on/off by round: {rounds}; first up: {up}")
    return "\n".join(out)


def summary_from(path: str) -> str:
    """The table again from a --json file (``python -m bench.metrics --table out.json``)."""
    document = orjson.loads(Path(path).read_bytes())
    return table(summarise(document["runs"]), document["meta"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured per row")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each row")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each arm, alternating")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument(
        "--table", metavar="JSON", help="print the table of an earlier run's --json, and stop"
    )
    args = parser.parse_args()
    if args.table:
        print(summary_from(args.table))
        return
    started = time.monotonic()
    observe_us = observe_cost_us()
    runs = asyncio.run(measure(args))
    meta = {"cores": os.cpu_count(), "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds,
            "wall_s": time.monotonic() - started, "observe_us": observe_us}  # fmt: skip
    rows = summarise(runs)
    print(table(rows, meta))
    if args.json:
        document = {"meta": meta, "runs": runs, "rows": rows}
        Path(args.json).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
