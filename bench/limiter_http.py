"""The limits through HTTP, A/B: the same gateway with the limiter and without it, at 1 and 64
clients, against a router and a zero-delay sim worker.

Both arms log callers in with a test-only authenticator (``Bearer bench`` is the user ``bench``),
so the difference is the limiter alone: its check, its headers, and the UsageRecords it reads.
Five limits apply to the caller and none refuses. Processes: the embedded nats-server, router and
worker, the gateway, the load generator (``bench.loadgen``); the arms alternate (``--rounds`` each) and the medians are compared. The gateway's CPU time per
request (from /proc) is the steadiest figure on a small or shared machine.

Run: ``.venv/bin/python -m bench.limiter_http [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import uuid

import msgspec
import orjson

from shared import config as cfg
from shared import schema
from shared.natsserver import EmbeddedNats

MODEL = "bench/sim"
BIG = {
    "requests_per_s": 1e9,
    "model_requests_per_s": 1e9,
    "tokens_per_min": 10**12,
    "model_tokens_per_min": 10**12,
}
USER = schema.Identity(user="bench", kind="key")


def config(prefix: str) -> cfg.Config:
    return msgspec.convert(
        {
            "nats": {"subject_prefix": prefix},
            "clusters": [{"name": "c"}],
            "models": [
                {
                    "id": MODEL,
                    "capacity": 256,
                    "tokens_per_min": 10**12,
                    "engine": {"kind": "sim", "ttft_ms": 0, "itl_ms": 0, "max_concurrency": 256},
                }
            ],
            "auth": {"methods": ["keys"]},
            "limits": {"user": BIG},
        },
        cfg.Config,
    )


class BenchAuth:
    name = "bench"

    def claims(self, credential: str) -> bool:
        return True

    async def identify(self, credential: str) -> schema.Identity:
        return USER

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


async def _backend(nats_url: str, prefix: str) -> None:
    import nats

    from services.router.service import Router
    from services.worker.engines import make_engine
    from services.worker.service import Worker
    from shared.subjects import Subjects

    conf, subjects = config(prefix), Subjects(prefix)
    model = conf.model(MODEL)
    async with (
        Router(await nats.connect(nats_url), subjects, conf),
        Worker(await nats.connect(nats_url), subjects, conf.worker, model, "c", make_engine(model)),
    ):
        print("ready", flush=True)
        await asyncio.Event().wait()


async def _gateway(nats_url: str, prefix: str, port: int, limits_on: bool) -> None:
    from services.gateway import keys, limits
    from services.gateway.app import create_app, start_site
    from services.gateway.auth import auth_ctx

    async def bench_auth_ctx(app):
        app[keys.AUTHENTICATORS] = [BenchAuth()]
        yield

    app = create_app(config(prefix), nats_url)
    app.cleanup_ctx[list(app.cleanup_ctx).index(auth_ctx)] = bench_auth_ctx
    if not limits_on:
        app.cleanup_ctx.remove(limits.limits_ctx)
    runner = await start_site(app, "127.0.0.1", port)
    try:
        print("ready", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _load(url: str, clients: int, seconds: float) -> None:
    from bench import loadgen

    plain = loadgen.Load.request_bytes
    loadgen.Load.request_bytes = lambda self: plain(self).replace(
        b"\r\nContent-Type:", b"\r\nAuthorization: Bearer bench\r\nContent-Type:", 1
    )
    load = loadgen.Load(url, MODEL, clients, seconds=seconds, warmup=1.0)
    print(orjson.dumps(await loadgen.run(load)).decode(), flush=True)


async def _child(*args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.limiter_http", *args, stdout=asyncio.subprocess.PIPE
    )
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if line.strip() != b"ready":
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc


async def _stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    await proc.wait()


async def _measure(nats_url: str, prefix: str, seconds: float, rounds: int) -> dict:
    from bench.procstat import process_cpu
    from services.worker.engines.openai_server import free_port

    results: dict[tuple[str, int], list[dict]] = {}
    backend = await _child("backend", nats_url, prefix)
    try:
        for arm in ("off", "on") * rounds:
            port = free_port()
            gateway = await _child("gateway", nats_url, prefix, str(port), arm)
            try:
                for clients in (1, 64):
                    cpu_before = process_cpu(gateway.pid)
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "bench.limiter_http", "load",
                        f"http://127.0.0.1:{port}/v1/chat/completions", str(clients), str(seconds),
                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                    )  # fmt: skip
                    out, _ = await proc.communicate()
                    result = orjson.loads(out.splitlines()[-1])
                    served = result["requests"] + result["warmup_requests"]
                    result["gateway_cpu_us"] = (process_cpu(gateway.pid) - cpu_before) * 1e6 / served
                    if result["errors"]:
                        raise RuntimeError(f"errors in arm {arm}: {result['errors_by_status']}")
                    results.setdefault((arm, clients), []).append(result)
                    print(
                        f"limits {arm:3}  {clients:2} clients  {result['req_per_s']:8.1f} req/s"
                        f"  p50 {result['latency_ms']['p50']:.3f} ms  gateway CPU {result['gateway_cpu_us']:.0f} µs/req",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                await _stop(gateway)
    finally:
        await _stop(backend)
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("backend", "gateway", "load"):
        _run_child(sys.argv[1], sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured per row, after 1 s of warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each arm, alternating")
    args = parser.parse_args()

    async def run() -> dict:
        async with EmbeddedNats() as server:
            return await _measure(server.url, f"b{uuid.uuid4().hex[:8]}", args.seconds, args.rounds)

    results = asyncio.run(run())
    print("\nmedians of the rounds")
    print("clients  limits off                       limits on                        change")
    for clients in (1, 64):
        off = results[("off", clients)]
        on = results[("on", clients)]
        rps_off = statistics.median(r["req_per_s"] for r in off)
        rps_on = statistics.median(r["req_per_s"] for r in on)
        p50_off = statistics.median(r["latency_ms"]["p50"] for r in off)
        p50_on = statistics.median(r["latency_ms"]["p50"] for r in on)
        cpu_off = statistics.median(r["gateway_cpu_us"] for r in off)
        cpu_on = statistics.median(r["gateway_cpu_us"] for r in on)
        print(
            f"{clients:>7}  {rps_off:7.1f} req/s {p50_off:6.3f} ms {cpu_off:5.0f} µs"
            f"  {rps_on:7.1f} req/s {p50_on:6.3f} ms {cpu_on:5.0f} µs"
            f"  {100 * (rps_on / rps_off - 1):+5.1f}% req/s, {1000 * (p50_on - p50_off):+6.1f} µs p50,"
            f" {cpu_on - cpu_off:+4.0f} µs gateway CPU per request"
        )


def _run_child(role: str, args: list[str]) -> None:
    from shared.logging import configure_logging

    configure_logging("warning")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        if role == "backend":
            runner(_backend(args[0], args[1]))
        elif role == "gateway":
            runner(_gateway(args[0], args[1], int(args[2]), args[3] == "on"))
        else:
            runner(_load(args[0], int(args[1]), float(args[2])))


if __name__ == "__main__":
    main()
