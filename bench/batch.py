"""Batch mode's throughput: one large batch through ``first up`` against a free simulated engine.

A fresh ``first up`` (embedded nats-server, gateway, router, scaler, batch service) and one worker
whose simulated engine answers at once (``ttft_ms = itl_ms = 0``): what is measured is the batch
path's own cost. The input file (``--lines`` chat requests) is uploaded with the openai SDK, the
batch created, and polled until it completes. Reported: lines/s from creation to completed (the
output file written), the validation phase on its own, and each process's peak RSS (VmHWM), to
show that no service holds the file.

Run: ``.venv/bin/python -m bench.batch [--lines 100000] [--in-flight 256]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import openai
import orjson

from bench import procstat
from tests.support import Stack

CONFIG = """
[nats]
url = ""
embedded_store_dir = "{store}"
[gateway]
request_timeout_s = 600
[batch]
max_in_flight = {in_flight}
progress_s = 1.0
[[clusters]]
name = "bench"
[[models]]
id = "bench/free"
capacity = {capacity}
engine = {{ kind = "sim", ttft_ms = 0, itl_ms = 0, max_concurrency = {capacity}, default_max_tokens = 8 }}
scaling = {{ min_hot = 1, max_workers = 1 }}
"""
MODEL = "bench/free"


def write_input(path: Path, lines: int) -> int:
    with path.open("wb") as f:
        for i in range(lines):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"question number {i}"}]}
            line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            f.write(orjson.dumps(line) + b"\n")
    return path.stat().st_size


def peak_rss_mb(root: int) -> dict[int, tuple[str, float]]:
    """Each process's peak resident memory (VmHWM) in the tree under ``root``, by command."""
    out = {}
    for p in procstat.tree(root):
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        hwm = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), "0")
        cmd = procstat.cmdline(p.pid)
        name = "worker" if " worker " in cmd else "nats-server" if "nats-server" in cmd else "first up"
        out[p.pid] = (name, int(hwm) / 1024)
    return out


async def main(lines: int, in_flight: int, capacity: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        tmp = Path(tmp)
        config = CONFIG.format(store=tmp / "nats", in_flight=in_flight, capacity=capacity)
        stack = Stack(config, tmp, name="bench")
        await stack.start(ready_models=[MODEL], timeout=120)
        try:
            size = write_input(tmp / "in.jsonl", lines)
            oai = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", timeout=600)
            t = time.monotonic()
            with (tmp / "in.jsonl").open("rb") as f:
                upload = await oai.files.create(file=("in.jsonl", f), purpose="batch")
            upload_s = time.monotonic() - t
            cpu0 = {p.pid: p.cpu_s for p in procstat.tree(stack.proc.pid)}
            t0 = time.monotonic()
            batch = await oai.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            validated_s = None
            while batch.status not in ("completed", "failed", "cancelled", "expired"):
                await asyncio.sleep(0.25)
                batch = await oai.batches.retrieve(batch.id)
                if validated_s is None and batch.status != "validating":
                    validated_s = time.monotonic() - t0
            took = time.monotonic() - t0
            cpu = {p.pid: p.cpu_s - cpu0.get(p.pid, 0.0) for p in procstat.tree(stack.proc.pid)}
            counts = batch.request_counts
            out = 0
            async with oai.with_streaming_response.files.content(batch.output_file_id) as r:
                async for chunk in r.iter_bytes():
                    out += chunk.count(b"\n")
            rss = peak_rss_mb(stack.proc.pid)
            await oai.close()
        finally:
            await stack.stop()
    print(f"lines {lines} ({size / 1e6:.1f} MB), max_in_flight {in_flight}, engine capacity {capacity}")
    print(f"upload           {upload_s:8.2f} s  ({size / 1e6 / upload_s:.0f} MB/s)")
    print(f"validation       {validated_s or 0:8.2f} s")
    print(f"create->complete {took:8.2f} s  {lines / took:8.0f} lines/s")
    print(f"status {batch.status}: completed {counts.completed}, failed {counts.failed}; output lines {out}")
    print("process              peak RSS (VmHWM)   CPU s during the batch")
    for pid, (name, mb) in sorted(rss.items(), key=lambda kv: kv[1][0]):
        print(f"  {name:12s} {pid:7d} {mb:10.1f} MB {cpu.get(pid, 0.0):12.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--in-flight", type=int, default=256, help="batch.max_in_flight")
    parser.add_argument("--capacity", type=int, default=256, help="the worker's capacity")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(args.lines, args.in_flight, args.capacity))
