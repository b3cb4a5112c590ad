"""What holding NATS-native callers to [limits] costs a router (services/router/native_limits.py).

Per request of a NATS-native caller, the router runs ``NativeLimits.admit`` (the gateway's
``Limiter.admit``). Per request of the whole deployment, one router of the queue group receives its
``UsageRecord`` on ``<p>.v1.usage``: a record of another caller is dropped on a byte search, one
of a NATS-native caller is decoded and its tokens counted (``Limiter.spent``).

Rows: the handler's work called directly (no NATS), and the delivery of records through a real
nats-server to one queue subscriber in this process, less the same publishing with no subscriber
(so what a router's event loop spends per record received). Five limits apply; none refuses.

Run: ``.venv/bin/python -m bench.native_limits [--records 100000]``; it prints µs per record.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from types import SimpleNamespace

import msgspec
import nats

from bench.limiter import BIG  # five limits so high that none refuses
from services.router.native_limits import NativeLimits
from shared import config as cfg
from shared import schema
from shared.events import EventPublisher
from shared.natsserver import EmbeddedNats
from shared.subjects import ROUTERS_QUEUE, Subjects

CONFIG = msgspec.convert(
    {
        "clusters": [{"name": "c"}],
        "models": [{"id": f"m{i}", "engine": {"kind": "sim"}, "tokens_per_min": 10**12} for i in range(4)],
        "nats": {"subject_prefix": "bench", "clients": [{"name": f"nat-{u}"} for u in range(64)]},
        "auth": {"methods": ["keys"]},
        "limits": {"user": BIG},
    },
    cfg.Config,
)
S = Subjects("bench")


def record(i: int, kind: str) -> bytes:
    user = f"nat-{i % 64}" if kind == "nats" else f"user-{i % 10_000}"
    return schema.encode(
        schema.UsageRecord(
            request_id=f"req-{i}", model=f"m{i % 4}", endpoint="chat", worker_id="w-1", cluster="c",
            outcome="ok", prompt_tokens=20, completion_tokens=16, ttft_s=0.01, duration_s=0.2,
            created=time.time(), sent=time.time(), identity=schema.Identity(user=user, kind=kind, name=user),
        )
    )  # fmt: skip


def limits(nc=None) -> NativeLimits:
    return NativeLimits(nc, S, CONFIG, EventPublisher(nc, S, "router-bench"))


def _stats(ns: list[int]) -> str:
    ns.sort()
    n = len(ns)
    return f"p50 {ns[n // 2] / 1000:6.2f} µs   p99 {ns[int(n * 0.99)] / 1000:6.2f} µs   mean {sum(ns) / n / 1000:6.2f} µs"


async def direct(n: int, kind: str) -> list[int]:
    """The usage handler on records already received."""
    nl = limits()
    msgs = [SimpleNamespace(data=record(i, kind), subject=S.usage) for i in range(n)]
    out, clock = [], time.perf_counter_ns
    gc.disable()
    try:
        for m in msgs:
            t0 = clock()
            await nl._on_usage(m)
            out.append(clock() - t0)
    finally:
        gc.enable()
    return out


def admit(n: int) -> list[int]:
    nl = limits()
    requests = [
        schema.InferRequest(
            request_id=f"r{i}", model=f"m{i % 4}", endpoint="chat", body=b"{}",
            reply_to=S.reply_stream(f"nat-{i % 64}", f"r{i}"), created=time.time(),
            identity=schema.Identity(user=f"nat-{i % 64}", kind="nats", name=f"nat-{i % 64}"),
        )
        for i in range(n)
    ]  # fmt: skip
    out, clock = [], time.perf_counter_ns
    gc.disable()
    try:
        for r in requests:
            t0 = clock()
            nl.admit(r)
            out.append(clock() - t0)
    finally:
        gc.enable()
    return out


async def delivered(url: str, n: int, kind: str, *, subscribed: bool) -> float:
    """Seconds to publish ``n`` records and (``subscribed``) have one queue subscriber handle them all."""
    pub, sub = await nats.connect(url), await nats.connect(url)
    nl = limits(sub)
    seen = 0
    done = asyncio.Event()

    async def on_usage(msg) -> None:
        nonlocal seen
        await nl._on_usage(msg)
        seen += 1
        if seen == n:
            done.set()

    if subscribed:
        await sub.subscribe(S.usage, queue=ROUTERS_QUEUE, cb=on_usage, pending_msgs_limit=n + 1)
        await sub.flush()
    data = [record(i, kind) for i in range(n)]
    t0 = time.perf_counter()
    for i, d in enumerate(data):
        await pub.publish(S.usage, d)
        if i % 1000 == 999:
            await asyncio.sleep(0)  # let the subscriber read as a router would, between requests
    await pub.flush()
    if subscribed:
        await asyncio.wait_for(done.wait(), 60)
    took = time.perf_counter() - t0
    assert not subscribed or nl.runs_counted == (n if kind == "nats" else 0)
    await pub.close()
    await sub.close()
    return took


async def main_async(n: int) -> None:
    print(f"{n} records each")
    print(f"admit (a NATS-native request)         {_stats(admit(n))}")
    for kind in ("key", "nats"):
        print(f"usage handler, a '{kind}' caller's run  {_stats(await direct(n, kind))}")
    async with EmbeddedNats() as server:
        for kind in ("key", "nats"):
            base = min([await delivered(server.url, n, kind, subscribed=False) for _ in range(3)])
            full = min([await delivered(server.url, n, kind, subscribed=True) for _ in range(3)])
            print(
                f"received by a router, '{kind}' runs      {(full - base) / n * 1e6:6.2f} µs per record "
                f"(publish only {base / n * 1e6:.2f} µs, with the router {full / n * 1e6:.2f} µs)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000)
    asyncio.run(main_async(parser.parse_args().records))


if __name__ == "__main__":
    main()
