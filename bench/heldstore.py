"""What keeping held requests in JetStream would cost, next to the core NATS publish the request path uses.

The design question (docs/protocol.md, "Held requests"): should a router keep the requests it
holds in a JetStream work queue, so another router can take them over when it dies, or should the
caller, which watches the router's heartbeats, submit them again? This measures the price of the
first on this machine: per held request, one JetStream publish acknowledged by the server (file
storage, as the embedded server runs it, and memory storage), one pull-fetch and one ack, against
one core publish. Requests that need no holding (a worker is free) would pay nothing either way.

Run: ``.venv/bin/python -m bench.heldstore [--messages 5000] [--concurrency 64]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import nats
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from shared.natsserver import EmbeddedNats

PAYLOAD = b"x" * 600  # about an encoded InferRequest with a short chat body


async def core(nc, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        await nc.publish(f"bench.core.{i % 8}", PAYLOAD)
    await nc.flush()
    return (time.perf_counter() - started) / n


async def jetstream(nc, n: int, concurrency: int, storage: StorageType) -> tuple[float, float, float]:
    """Seconds per message: publish with ack (one at a time), publish (concurrent), fetch+ack."""
    js = nc.jetstream()
    name = f"HELD_{storage.value.upper()}_{os.getpid()}"
    await js.add_stream(
        StreamConfig(name=name, subjects=[f"{name}.>"], retention=RetentionPolicy.WORK_QUEUE, storage=storage)
    )
    latencies = []
    for i in range(min(n, 2000)):
        t = time.perf_counter()
        await js.publish(f"{name}.m{i % 8}", PAYLOAD)
        latencies.append(time.perf_counter() - t)
    sequential = statistics.median(latencies)
    queue = iter(range(n))

    async def publisher():
        for i in queue:
            await js.publish(f"{name}.m{i % 8}", PAYLOAD)

    started = time.perf_counter()
    await asyncio.gather(*(publisher() for _ in range(concurrency)))
    concurrent = (time.perf_counter() - started) / n
    sub = await js.pull_subscribe(f"{name}.>", durable="routers")
    taken, started = 0, time.perf_counter()
    while taken < n:
        for msg in await sub.fetch(256, timeout=5):
            await msg.ack()
            taken += 1
    fetched = (time.perf_counter() - started) / n
    await js.delete_stream(name)
    return sequential, concurrent, fetched


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    async with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        per_core = await core(nc, args.messages)
        rows = [("core publish (the request path)", per_core, per_core, 0.0)]
        for storage in (StorageType.FILE, StorageType.MEMORY):
            seq, conc, fetch = await jetstream(nc, args.messages, args.concurrency, storage)
            rows.append((f"JetStream {storage.value} publish+ack, fetch+ack", seq, conc, fetch))
        await nc.close()
    print(f"{args.messages} messages of {len(PAYLOAD)} bytes, {args.concurrency} concurrent publishers")
    print(f"{'path':<44} {'1 at a time':>12} {'concurrent':>11} {'fetch+ack':>10}   (microseconds/message)")
    for name, seq, conc, fetch in rows:
        print(f"{name:<44} {seq * 1e6:>12.0f} {conc * 1e6:>11.0f} {fetch * 1e6:>10.0f}")


if __name__ == "__main__":
    asyncio.run(main())
