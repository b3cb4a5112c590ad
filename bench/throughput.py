"""Token throughput of the whole stack with a simulated engine that costs nothing.

With ``ttft_ms = itl_ms = 0`` the engine is free, so what is measured is the stack's own cost:
gateway, router, worker, NATS. Four runs, each against a fresh ``first up`` on one nats-server:

  nats, pack 0     the NATS-native client (shared.client), one message per token   <- baseline
  nats, pack 5     the same, tokens packed in 5 ms windows
  http, pack 0     streaming through the HTTP gateway (SSE), one message per token
  http, pack 5     the same with packing

Run: ``make bench`` or ``.venv/bin/python -m bench.throughput [--requests N] [--concurrency C]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import nats
import orjson

from shared.client import FirstClient
from shared.natsserver import EmbeddedNats
from shared.subjects import Subjects
from tests.support import Stack, free_port

CONFIG = """
[nats]
url = "{url}"
subject_prefix = "{prefix}"
[worker]
pack_interval_ms = {pack}
[[clusters]]
name = "bench"
[[models]]
id = "bench/free"
capacity = {concurrency}
engine = {{ kind = "sim", ttft_ms = 0, itl_ms = 0, max_concurrency = {concurrency} }}
scaling = {{ min_hot = 1, max_workers = 1 }}
"""
MODEL = "bench/free"


async def run_load(call, requests: int, concurrency: int) -> tuple[float, list[float], int]:
    """Run ``requests`` calls, ``concurrency`` at a time; seconds, per-request latencies, tokens."""
    latencies: list[float] = []
    tokens = 0
    queue = iter(range(requests))

    async def one_client():
        nonlocal tokens
        for i in queue:
            started = time.perf_counter()
            n = await call(i)  # not `tokens += await ...`: that would read tokens before awaiting
            tokens += n
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, tokens


async def measure(nats_url: str, tmp: Path, *, pack: float, via: str, args) -> dict:
    prefix = f"bench{os.getpid()}p{int(pack)}{via}"
    text = CONFIG.format(url=nats_url, prefix=prefix, pack=pack, concurrency=args.concurrency)
    stack = await Stack(text, tmp, name=prefix).start(ready_models=[MODEL])
    body = {"model": MODEL, "prompt": "benchmark", "max_tokens": args.tokens, "stream": True}
    try:
        if via == "nats":
            nc = await nats.connect(nats_url)
            client = FirstClient(nc, Subjects(prefix))
            await client.start()

            async def call(i: int) -> int:
                payload = orjson.dumps(dict(body, seed=i))
                result = await client.complete(MODEL, "completion", payload)
                return result.usage.completion_tokens

            elapsed, latencies, tokens = await run_load(call, args.requests, args.concurrency)
            await client.stop()
            await nc.close()
        else:
            connector = aiohttp.TCPConnector(limit=args.concurrency)
            async with aiohttp.ClientSession(connector=connector) as http:
                url = stack.base_url + "/v1/completions"

                async def call(i: int) -> int:
                    # Tokens from the usage chunk: the gateway may carry several in one event.
                    n = 0
                    streamed = dict(body, seed=i, stream_options={"include_usage": True})
                    async with http.post(url, json=streamed) as r:
                        async for line in r.content:
                            if line.startswith(b"data: {") and (usage := orjson.loads(line[6:]).get("usage")):
                                n = usage["completion_tokens"]
                    return n

                elapsed, latencies, tokens = await run_load(call, args.requests, args.concurrency)
    finally:
        await stack.stop()
    return {
        "tokens_per_s": tokens / elapsed,
        "requests_per_s": args.requests / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--tokens", type=int, default=64, help="max_tokens per request (the sim stops at 8-31)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(port=free_port()) as server:
            for via in ("nats", "http"):
                for pack in (0.0, 5.0):
                    rows.append(
                        (via, pack, await measure(server.url, Path(tmp), pack=pack, via=via, args=args))
                    )
    base = rows[0][2]["tokens_per_s"]
    print(f"{args.requests} requests, {args.concurrency} concurrent, simulated engine at zero cost")
    print(f"{'path':<6} {'pack_ms':>7} {'tokens/s':>10} {'req/s':>8} {'p50 ms':>8} {'vs baseline':>12}")
    for via, pack, r in rows:
        ratio = r["tokens_per_s"] / base
        print(
            f"{via:<6} {pack:>7g} {r['tokens_per_s']:>10.0f} {r['requests_per_s']:>8.1f}"
            f" {r['p50_ms']:>8.1f} {ratio:>11.2f}x"
        )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
