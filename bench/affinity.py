"""What session affinity saves: conversations of several turns over four simulated workers whose
prefill costs time per prompt token not in their prefix cache, with and without session keys.

Each of ``--sessions`` conversations sends ``--turns`` requests one after another, ``--think``
seconds apart (the sessions at once); every turn's prompt is the conversation so far plus
``--words`` new words, as a chat's messages are. The engine: ``prefill_ms_per_token`` 0.2 for tokens it has not cached, a prefix
cache of ``--cache`` tokens per worker (blocks of 16, least recently used dropped), 8 tokens out.
One real nats-server, one router, four workers and one client, in this process; each arm gets
fresh workers (empty caches). Printed: latency per request and the prompt tokens the engines
computed anew or found cached.

Run: ``.venv/bin/python -m bench.affinity [--sessions 32] [--turns 8]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time

import msgspec
import nats
import orjson

from services.router.service import Router
from services.worker.engines import make_engine
from services.worker.service import Worker
from shared import config as cfg
from shared.client import FirstClient
from shared.natsserver import EmbeddedNats
from shared.subjects import Subjects

WORKERS = 4


def config(cache_tokens: int) -> cfg.Config:
    engine = {"kind": "sim", "ttft_ms": 2, "itl_ms": 1, "default_max_tokens": 8,
              "prefill_ms_per_token": 0.2, "prefix_cache_tokens": cache_tokens}  # fmt: skip
    raw = {"clusters": [{"name": "c"}], "models": [{"id": "m", "capacity": 8, "engine": engine}],
           "worker": {"heartbeat_s": 0.2}}  # fmt: skip
    return msgspec.convert(raw, cfg.Config)


async def arm(url: str, args: argparse.Namespace, keyed: bool, n: int) -> dict:
    conf = config(args.cache)
    subjects = Subjects(f"aff{n}")
    async with contextlib.AsyncExitStack() as stack:
        connections = []

        async def connect():
            nc = await nats.connect(url)
            connections.append(nc)
            return nc

        await stack.enter_async_context(Router(await connect(), subjects, conf))
        workers = []
        for i in range(WORKERS):
            engine = make_engine(conf.models[0])
            worker = Worker(
                await connect(), subjects, conf.worker, conf.models[0], "c", engine, worker_id=f"w{i}"
            )
            workers.append(await stack.enter_async_context(worker))
        client = await stack.enter_async_context(FirstClient(await connect(), subjects))
        await asyncio.sleep(0.5)  # the router hears every worker
        latencies: list[float] = []

        async def conversation(s: int) -> None:
            history: list[str] = []
            for t in range(args.turns):
                if t:
                    await asyncio.sleep(args.think)  # the person reads, then writes again
                history += [f"s{s}t{t}w{i}" for i in range(args.words)]
                body = orjson.dumps({"messages": [{"role": "user", "content": " ".join(history)}]})
                started = time.perf_counter()
                await client.complete("m", "chat", body, session=f"conv-{s}" if keyed else "")
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(conversation(s) for s in range(args.sessions)))
        wall = time.perf_counter() - began
        caches = [w.engine.prefix_cache for w in workers]
        for nc in connections:
            await nc.close()
    computed, reused = sum(c.computed for c in caches), sum(c.reused for c in caches)
    return {
        "keyed": keyed,
        "mean_ms": 1000 * statistics.fmean(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p90_ms": 1000 * statistics.quantiles(latencies, n=10)[-1],
        "wall_s": wall,
        "cached_share": reused / max(1, computed + reused),
    }


async def main(args: argparse.Namespace) -> None:
    async with EmbeddedNats() as server:
        rows = [await arm(server.url, args, keyed, n) for n, keyed in enumerate((False, True))]
    print(f"{args.sessions} sessions x {args.turns} turns {args.think:g} s apart, +{args.words} words a turn, {WORKERS} workers,"
          f" prefix cache {args.cache} tokens each, prefill 0.2 ms per uncached token")  # fmt: skip
    print(
        f"{'session keys':<13} {'mean ms':>8} {'p50 ms':>8} {'p90 ms':>8} {'wall s':>7} {'prompt cached':>14}"
    )
    for r in rows:
        print(f"{'yes' if r['keyed'] else 'no':<13} {r['mean_ms']:8.1f} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f}"
              f" {r['wall_s']:7.2f} {100 * r['cached_share']:13.0f}%")  # fmt: skip
    print(f"mean latency with keys / without: {rows[1]['mean_ms'] / rows[0]['mean_ms']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--words", type=int, default=64, help="new words a turn")
    parser.add_argument("--cache", type=int, default=8192, help="prefix cache tokens per worker")
    parser.add_argument("--think", type=float, default=0.5, help="seconds between a session's turns")
    asyncio.run(main(parser.parse_args()))
