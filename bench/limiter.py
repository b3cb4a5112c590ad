"""What the request and token limits cost per request, without HTTP: the limiter's hot path timed
call by call.

Per request a gateway runs ``admit`` (limits_for, five window reads, two adds) and the headers
(``rate_headers``, added to the answer), and counts the tokens of the answer (``spent``: three adds); once per share
interval, every other gateway takes in its AdmittedRequests (amortized here over the requests of
one interval). Five limits apply in every row (the worst case), none refuses.

Run: ``.venv/bin/python -m bench.limiter [--requests 200000]``; it prints µs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import msgspec
from aiohttp import web

from services.gateway.limits import rate_headers
from shared import config as cfg
from shared import schema
from shared.limits import Limiter
from shared.subjects import Subjects

BIG = {
    "requests_per_s": 1e9,
    "model_requests_per_s": 1e9,
    "tokens_per_min": 10**12,
    "model_tokens_per_min": 10**12,
}
CONFIG = msgspec.convert(
    {
        "clusters": [{"name": "c"}],
        "models": [{"id": f"m{i}", "engine": {"kind": "sim"}, "tokens_per_min": 10**12} for i in range(4)],
        "auth": {"methods": ["keys"]},
        "limits": {"user": BIG, "groups": {"g1": BIG, "g2": BIG, "g3": BIG}},
    },
    cfg.Config,
)


def _stats(ns: list[int]) -> str:
    ns.sort()
    n = len(ns)
    return f"p50 {ns[n // 2] / 1000:6.2f} µs   p99 {ns[int(n * 0.99)] / 1000:6.2f} µs   mean {sum(ns) / n / 1000:6.2f} µs"


def _time(calls: int, step) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for i in range(calls):
            t0 = clock()
            step(i)
            out.append(clock() - t0)
    finally:
        gc.enable()
    return out


async def _time_async(calls: int, step) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for i in range(calls):
        t0 = clock()
        await step(i)
        out.append(clock() - t0)
    return out


def _limiter() -> Limiter:
    return Limiter(None, Subjects("bench"), CONFIG)  # admit and the callbacks' work need no NATS


def bench_admit(requests: int, users: int, groups: list[str]) -> list[int]:
    limiter = _limiter()
    identities = [schema.Identity(user=f"user-{u}", kind="key", groups=groups) for u in range(users)]
    models = [m.id for m in CONFIG.models]
    return _time(requests, lambda i: limiter.admit(identities[i % users], models[i % 4]))


async def bench_headers(requests: int) -> list[int]:
    limiter = _limiter()
    standing = limiter.admit(schema.Identity(user="u", kind="key"), "m0").standing

    async def step(_):
        web.Response().headers.extend(rate_headers(standing))

    baseline = await _time_async(requests, lambda _: _noop_response())
    measured = await _time_async(requests, step)
    return [max(0, a - b) for a, b in zip(sorted(measured), sorted(baseline), strict=True)]


async def _noop_response() -> None:
    web.Response()


def bench_spent(requests: int, users: int) -> list[int]:
    """An answer's tokens counted at the gateway that delivered it (``Limiter.spent``)."""
    limiter = _limiter()
    identities = [schema.Identity(user=f"user-{u}", kind="key", groups=["g1"]) for u in range(users)]

    def step(i: int) -> None:
        limiter.spent(identities[i % users], f"m{i % 4}", 36)

    return _time(requests, step)


def bench_share(users: int, per_interval: int) -> float:
    """µs per request of one AdmittedRequests: built and sent by one gateway, taken in by another."""
    sender, receiver = _limiter(), _limiter()
    for i in range(per_interval):
        sender.ledger.admit(f"user-{i % users}", CONFIG.limits.user, f"m{i % 4}")
        sender.ledger.spent_here(f"user-{i % users}", f"m{i % 4}", 36)
    rounds = 200
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        unshared = dict(sender.ledger.unshared)
        counts = [schema.Admitted(u, n, m, t) for (u, m), (n, t) in unshared.items()]
        data = schema.encode(schema.AdmittedRequests("gw", counts))
        for a in schema.admitted_decoder.decode(data).counts:
            receiver.ledger.admitted_elsewhere(a.user, a.model, a.requests)
            receiver.ledger.spent(a.user, a.model, a.tokens)
    return (time.perf_counter_ns() - t0) / rounds / per_interval / 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200_000)
    n = parser.parse_args().requests
    print(f"{n} calls each; five limits apply, none refuses")
    print(f"admit, 1 user, no groups          {_stats(bench_admit(n, 1, []))}")
    print(f"admit, 10,000 users, no groups    {_stats(bench_admit(n, 10_000, []))}")
    print(f"admit, 10,000 users, 3 groups     {_stats(bench_admit(n, 10_000, ['g1', 'g2', 'g3']))}")
    print(f"x-ratelimit headers               {_stats(asyncio.run(bench_headers(n)))}")
    print(f"an answer's tokens (spent)        {_stats(bench_spent(n, 10_000))}")
    for rate in (100, 5000):  # requests per second through one gateway: per_interval = rate x 0.1 s
        per_interval = rate // 10
        us = bench_share(min(per_interval, 64), per_interval)
        print(
            f"sharing at {rate:>5} req/s, 64 users  mean {us:6.2f} µs per request (out of the request path)"
        )


if __name__ == "__main__":
    main()
