"""What API keys, limits and usage accounting add to the request path: one stack, A/B.

The stack is ``bench.requestpath``'s (``first up`` with an embedded nats-server, and one worker
whose ``openai`` engine is the zero-delay ``tests.mock_engine``), started afresh for each arm in
each round; the arms alternate (off, on, on, off, ...; ``--rounds`` each) and medians are compared.

- ``off``: ``auth.methods = ["none"]`` (the default), no ``[limits]``: no authenticator, no
  limiter. It still has the auth middleware (which finds no authenticator), the anonymous identity
  on the wire, and the worker's UsageRecord per run, published and stored by the usage stream.
- ``on``: ``auth.methods = ["keys"]`` with a real key (``first keys create`` against the stack's
  NATS, with the admin seed from ``nats.embedded_store_dir``), and the four ``[limits.user]`` limits
  and the model's ``tokens_per_min``, so large none refuses: the key check, the limiter's check,
  its x-ratelimit headers, its count of each answer's tokens and its summary every 0.1 s.

In both arms the usage stream exists (the router makes it) and NATS permissions are on (one nkey
user per role). Rows: requestpath's whole answers (``/v1/completions``, 16 tokens) from 1 and 64
clients. ``bench.loadgen`` sends no headers: this module's ``load`` child runs it with
``Authorization: Bearer <key>`` added. Stack CPU per request from /proc, as in requestpath.

Run: .venv/bin/python -m bench.auth [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from bench import requestpath as rp
from tests import support

ARMS = ("off", "on")
CLIENTS = (rp.SWEEP[0].clients, rp.SWEEP[-1].clients)  # 1 and 64, whole answers
BIG_TPM = 10**12
ON = f"""tokens_per_min = {BIG_TPM}
[auth]
methods = ["keys"]
[limits.user]
requests_per_s = 1e9
model_requests_per_s = 1e9
tokens_per_min = {BIG_TPM}
model_tokens_per_min = {BIG_TPM}
"""
TARGET_ADDED_P50_MS, TARGET_RATIO_64 = 0.2, 0.90


def config_text(arm: str, engine_url: str, store: Path) -> str:
    """requestpath's config with the store of the embedded server's seeds, and in ``on`` auth and limits."""
    text = rp.CONFIG.format(model=rp.MODEL, engine_url=engine_url, served=rp.SERVED)
    text = text.replace("[nats]\n", f"[nats]\nembedded_store_dir = {str(store)!r}\n", 1)
    assert "embedded_store_dir" in text and text.rstrip().endswith("}"), "requestpath.CONFIG changed"
    return text + (ON if arm == "on" else "")


async def _make_key(stack: support.Stack) -> str:
    """A key made by the real ``first keys create``, which finds the stack's embedded server and
    its admin seed through ``nats.embedded_store_dir``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "keys", "create", "bench", "--config", str(stack.config_path),
        "--log-level", "warning",
        cwd=support.ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"first keys create failed: {err.decode(errors='replace')}")
    return out.decode().strip()


async def start_stack(arm: str, folder: Path, engine_url: str) -> tuple[support.Stack, str]:
    """A fresh ``first up`` for one arm, ready to serve; and for ``on``, its key."""
    stack = support.Stack(config_text(arm, engine_url, folder / "nats"), folder, name=f"auth-{arm}")
    if arm == "off":
        return await stack.start(ready_models=[rp.MODEL], timeout=90), ""
    await stack.start(timeout=90)  # answering (401s, for want of a key)
    key = await _make_key(stack)

    async def live() -> bool:
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.get(stack.base_url + "/v1/models") as r,
        ):
            return r.status == 200 and any(m["status"] == "live" for m in (await r.json())["data"])

    await support.eventually(live, timeout=90, interval=0.2, what=f"{rp.MODEL} to serve the key")
    return stack, key


async def drive(url: str, key: str, clients: int, args, stack_pid: int, mock_pid: int) -> dict:
    """requestpath.drive with the key's header: one ``load`` child, CPU counted around its measured part."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.auth", "load", url + "/v1/completions", str(clients),
        str(args.seconds), str(args.warmup), key,
        cwd=support.ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        err = b""
        while (line := await proc.stderr.readline()) and line.strip() != b"measuring":
            err += line
        others = {"mock": mock_pid, "loadgen": proc.pid}
        before = await asyncio.to_thread(rp._snapshot, stack_pid, others)
        out = await proc.stdout.readline()
        after = await asyncio.to_thread(rp._snapshot, stack_pid, others)
        err += await proc.stderr.read()
        if await proc.wait() != 0 or not out:
            raise RuntimeError(f"the load failed: {err.decode(errors='replace')[-2000:]}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    result = orjson.loads(out)
    result["cpu"] = rp._cpu_figures(before, after, result["requests"])
    return result


async def one_arm(arm: str, folder: Path, engine_url: str, args, mock_pid: int) -> tuple[list, list]:
    """A fresh stack for ``arm``, every row through it; and its log's nats_permission_violation lines."""
    stack, key = await start_stack(arm, folder, engine_url)
    runs = []
    try:
        for clients in CLIENTS:
            r = await drive(stack.base_url, key, clients, args, stack.proc.pid, mock_pid)
            runs.append({"arm": arm, "clients": clients, **r})
            print(f"  {arm:<3} {clients:>2} clients {r['req_per_s']:7.0f} req/s p50 {r['latency_ms']['p50']:.3f}"
                  f" ms, stack CPU {r['cpu']['stack_ms_per_req']:.3f} ms/req", file=sys.stderr)  # fmt: skip
            if r["errors"] or not r["requests"]:
                raise RuntimeError(f"{arm}: errors {r['errors_by_status']}\n{stack.log_tail(20)}")
    finally:
        await stack.stop()
    log = stack.log_path.read_text(errors="replace").splitlines()
    return runs, [line for line in log if "nats_permission_violation" in line]


async def measure(args) -> tuple[list[dict], list[str]]:
    """The arms alternate, off first in even rounds and on first in odd ones, against one mock."""
    runs, violations = [], []
    mock_proc, engine_url = await rp.start_mock()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
            for n in range(args.rounds):
                for arm in ARMS if n % 2 == 0 else ARMS[::-1]:
                    (folder := Path(tmp) / f"{arm}-{n}").mkdir()
                    found, seen = await one_arm(arm, folder, engine_url, args, mock_proc.pid)
                    runs += [dict(r, round=n) for r in found]
                    violations += seen
    finally:
        await rp.stop(mock_proc)
    return runs, violations


def _spread(values) -> dict:
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict]) -> dict:
    """Medians (and ranges) over the rounds, by arm and clients, and the two verdicts."""
    rows = {}
    for arm in ARMS:
        for clients in CLIENTS:
            mine = [r for r in runs if r["arm"] == arm and r["clients"] == clients]
            rows[f"{arm}/{clients}"] = {
                "arm": arm, "clients": clients, "rounds": len(mine),
                "req_per_s": _spread(r["req_per_s"] for r in mine),
                "p50_ms": _spread(r["latency_ms"]["p50"] for r in mine),
                "p99_ms": _spread(r["latency_ms"]["p99"] for r in mine),
                "stack_cpu_ms_per_req": _spread(r["cpu"]["stack_ms_per_req"] for r in mine),
                "other_cores": _spread(r["cpu"]["other_cores"] for r in mine),
            }  # fmt: skip
    one, many = CLIENTS
    added = rows[f"on/{one}"]["p50_ms"]["median"] - rows[f"off/{one}"]["p50_ms"]["median"]
    ratio = rows[f"on/{many}"]["req_per_s"]["median"] / rows[f"off/{many}"]["req_per_s"]["median"]
    # The arms of one round run back to back: their ratio is the paired one, free of slow drifts.
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["clients"] == many:
            by_round.setdefault(r["round"], {})[r["arm"]] = r["req_per_s"]
    paired = _spread(v["on"] / v["off"] for v in by_round.values() if len(v) == 2)
    verdict = {"added_p50_ms_1": added, "added_p50_met": added <= TARGET_ADDED_P50_MS,
               "req_per_s_ratio_64": ratio, "req_per_s_ratio_met": ratio >= TARGET_RATIO_64,
               "req_per_s_ratio_64_paired": paired}  # fmt: skip
    return {"rows": rows, "verdict": verdict}


def table(summary: dict, meta: dict) -> str:
    def cell(s: dict, fmt: str) -> str:
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"

    out = [
        f"auth + limits + accounting, A/B: median (min-max) of {meta['rounds']} rounds per arm;"
        f" {meta['seconds']:g} s per row after {meta['warmup']:g} s of warm-up; {meta['cores']} cores shared;"
        " other load: cores the rest of the machine used meanwhile (noise)",
        f"{'arm':<4} {'clients':>7} {'req/s':>17} {'p50 ms':>19} {'p99 ms':>7} {'stack CPU ms/req':>21} {'other load':>16}",
    ]
    for row in summary["rows"].values():
        out.append(
            f"{row['arm']:<4} {row['clients']:>7} {cell(row['req_per_s'], '{:.0f}'):>17}"
            f" {cell(row['p50_ms'], '{:.2f}'):>19} {row['p99_ms']['median']:7.2f}"
            f" {cell(row['stack_cpu_ms_per_req'], '{:.3f}'):>21} {cell(row['other_cores'], '{:.2f}'):>16}"
        )
    v = summary["verdict"]
    out += [
        "",
        f"added p50 at 1 client: {v['added_p50_ms_1']:+.3f} ms (target <= {TARGET_ADDED_P50_MS} ms)"
        f" {'met' if v['added_p50_met'] else 'MISSED'}",
        f"req/s at 64 clients: on/off = {v['req_per_s_ratio_64']:.3f} (target >= {TARGET_RATIO_64:.2f})"
        f" {'met' if v['req_per_s_ratio_met'] else 'MISSED'}",
        "  the same, round by round: median {median:.3f} (min {min:.3f}, max {max:.3f})".format(
            **v["req_per_s_ratio_64_paired"]
        ),
    ]
    return "\n".join(out)


async def _load(url: str, clients: int, seconds: float, warmup: float, key: str) -> None:
    """The ``load`` child: bench.loadgen's run, with the key's header in its request."""
    from bench import loadgen

    if key:  # the off arm sends none
        plain = loadgen.Load.request_bytes
        header = f"\r\nAuthorization: Bearer {key}\r\nContent-Type:".encode()
        loadgen.Load.request_bytes = lambda self: plain(self).replace(b"\r\nContent-Type:", header, 1)
    load = loadgen.Load(url, rp.MODEL, clients, seconds=seconds, warmup=warmup)
    sys.stdout.write(orjson.dumps(await loadgen.run(load)).decode() + "\n")


def main() -> None:
    if sys.argv[1:2] == ["load"]:
        url, clients, seconds, warmup, key = sys.argv[2:7]
        try:
            import uvloop as runner
        except ImportError:
            runner = asyncio
        with contextlib.suppress(KeyboardInterrupt):
            runner.run(_load(url, int(clients), float(seconds), float(warmup), key))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured per row")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each row")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each arm, alternating")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    started = time.monotonic()
    runs, violations = asyncio.run(measure(args))
    meta = {"cores": os.cpu_count(), "seconds": args.seconds, "warmup": args.warmup,
            "rounds": args.rounds, "wall_s": time.monotonic() - started, "python": sys.version.split()[0]}  # fmt: skip
    summary = summarise(runs)
    print(table(summary, meta))
    if violations:
        print(f"\n{len(violations)} nats_permission_violation lines in the stacks' logs:")
        print("\n".join(violations[:20]))
    if args.json:
        document = {"meta": meta, "runs": runs, **summary, "permission_violations": violations}
        Path(args.json).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
