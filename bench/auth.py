"""What API keys, limits and usage accounting add to the request path: one stack, A/B.

The stack is ``bench.requestpath``'s (``first up`` with an embedded nats-server, and one worker
whose ``openai`` engine is the zero-delay ``tests.mock_engine``), started afresh for each arm in
each round; the arms alternate (off, on, globus; then on, globus, off; ...: the order rotates each
round, ``--rounds`` each; ``--arms`` picks some) and medians are compared.

- ``off``: ``auth.methods = ["none"]`` (the default), no ``[limits]``: no authenticator, no
  limiter. It still has the auth middleware (which finds no authenticator), the anonymous identity
  on the wire, and the worker's UsageRecord per run, published and stored by the usage stream.
- ``on``: ``auth.methods = ["keys"]`` with a real key (``first keys create`` against the stack's
  NATS, with the admin seed from ``nats.embedded_store_dir``), and the four ``[limits.user]`` limits
  and the model's ``tokens_per_min``, so large none refuses: the key check, the limiter's check,
  its x-ratelimit headers, its count of each answer's tokens and its summary every 0.1 s.
- ``globus``: as ``on``, but ``auth.methods = ["globus"]``: a cached Globus access token. Its
  ``[auth.globus]`` points at the Globus Auth double (tests/globus_double.py, a real aiohttp server
  run in this parent process, whose event loop is idle while the load child runs), with an allowed
  identity-provider domain and a required group; the double issues one token for one identity, a
  member of that group. The gateway introspects it (and reads its groups) once, when the stack is
  first asked, and serves every measured request from its cache: the double's introspections are
  printed for each arm's run (expect 1, and 0 during the measured rows).

In every arm the usage stream exists (the router makes it) and NATS permissions are on (one nkey
user per role). Rows: requestpath's whole answers (``/v1/completions``, 16 tokens) from 1 and 64
clients. ``bench.loadgen`` sends no headers: this module's ``load`` child runs it with
``Authorization: Bearer <key or token>`` added. Stack CPU per request from /proc, as in requestpath.

Run: .venv/bin/python -m bench.auth [--seconds 5] [--rounds 3] [--arms off,on,globus]
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
from tests.globus_double import GlobusDouble, GlobusIdentity

ARMS = ("off", "on", "globus")
CLIENTS = (rp.SWEEP[0].clients, rp.SWEEP[-1].clients)  # 1 and 64, whole answers
BIG_TPM = 10**12
LIMITS = f"""tokens_per_min = {BIG_TPM}
[limits.user]
requests_per_s = 1e9
model_requests_per_s = 1e9
tokens_per_min = {BIG_TPM}
model_tokens_per_min = {BIG_TPM}
"""
TARGET_ADDED_P50_MS, TARGET_RATIO_64 = 0.2, 0.90
GROUP = "3f1e0c6a-0000-4000-8000-00000000be7c"  # a Globus group id: the bench user's, and required
USER = GlobusIdentity("bench@anl.gov", "Bench")


def config_text(arm: str, engine_url: str, store: Path, globus: dict | None = None) -> str:
    """requestpath's config with the store of the embedded server's seeds; in ``on`` and ``globus``,
    the limits and that arm's credential (``globus``: the ``[auth.globus]`` settings)."""
    text = rp.CONFIG.format(model=rp.MODEL, engine_url=engine_url, served=rp.SERVED)
    text = text.replace("[nats]\n", f"[nats]\nembedded_store_dir = {str(store)!r}\n", 1)
    assert "embedded_store_dir" in text and text.rstrip().endswith("}"), "requestpath.CONFIG changed"
    if arm == "off":
        return text
    auth = '[auth]\nmethods = ["keys"]\n'
    if arm == "globus":
        fields = "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in (globus or {}).items())
        auth = f'[auth]\nmethods = ["globus"]\n[auth.globus]\n{fields}'
    return text + LIMITS + auth


def globus_settings(double: GlobusDouble, folder: Path) -> dict:
    """``[auth.globus]`` pointed at the double, as tests/integration/test_auth_globus.py does: its
    client's secret in a file, the bench user's domain allowed and its group required."""
    (secret := folder / "globus-client-secret").write_text(double.client_secret + "\n")
    return {
        "client_id": double.client_id,
        "client_secret_file": str(secret),
        "auth_url": double.url,
        "groups_url": double.url,
        "allowed_idp_domains": [USER.domain],
        "groups": [GROUP],
    }


class Globus:
    """The Globus Auth double, run on this process's event loop for every ``globus`` arm, and the
    one token it issued (one identity, a member of ``GROUP``)."""

    def __init__(self, double: GlobusDouble):
        self.double = double
        self.token = double.issue(USER, groups=[GROUP], lifetime_s=7 * 24 * 3600.0)


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


async def start_stack(
    arm: str, folder: Path, engine_url: str, globus: Globus | None
) -> tuple[support.Stack, str]:
    """A fresh ``first up`` for one arm, ready to serve; and for ``on`` its key, for ``globus`` the token."""
    settings = globus_settings(globus.double, folder) if arm == "globus" else None
    stack = support.Stack(config_text(arm, engine_url, folder / "nats", settings), folder, name=f"auth-{arm}")
    if arm == "off":
        return await stack.start(ready_models=[rp.MODEL], timeout=90), ""
    await stack.start(timeout=90)  # answering (401s, for want of a credential)
    key = globus.token if arm == "globus" else await _make_key(stack)

    async def live() -> bool:
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.get(stack.base_url + "/v1/models") as r,
        ):
            return r.status == 200 and any(m["status"] == "live" for m in (await r.json())["data"])

    await support.eventually(
        live, timeout=90, interval=0.2, what=f"{rp.MODEL} to serve the {arm} arm's credential"
    )
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


async def one_arm(
    arm: str, folder: Path, engine_url: str, args, mock_pid: int, globus: Globus | None
) -> tuple[list, list]:
    """A fresh stack for ``arm``, every row through it; and its log's nats_permission_violation lines.
    In ``globus`` each row has the double's introspections during it, and the progress line the
    arm run's total (the stack's start included)."""
    count = (lambda: globus.double.introspections) if arm == "globus" else (lambda: 0)
    at_start = count()
    stack, key = await start_stack(arm, folder, engine_url, globus)
    runs = []
    try:
        for clients in CLIENTS:
            before = count()
            r = await drive(stack.base_url, key, clients, args, stack.proc.pid, mock_pid)
            if arm == "globus":
                r["introspections"] = count() - before
            runs.append({"arm": arm, "clients": clients, **r})
            print(f"  {arm:<6} {clients:>2} clients {r['req_per_s']:7.0f} req/s p50 {r['latency_ms']['p50']:.3f}"
                  f" ms, stack CPU {r['cpu']['stack_ms_per_req']:.3f} ms/req", file=sys.stderr)  # fmt: skip
            if r["errors"] or not r["requests"]:
                raise RuntimeError(f"{arm}: errors {r['errors_by_status']}\n{stack.log_tail(20)}")
    finally:
        await stack.stop()
    if arm == "globus":
        print(f"  globus: {count() - at_start} Globus introspections in this arm run (its start included),"
              f" {sum(r['introspections'] for r in runs)} during its rows of"
              f" {sum(r['requests'] for r in runs)} requests", file=sys.stderr)  # fmt: skip
    log = stack.log_path.read_text(errors="replace").splitlines()
    return runs, [line for line in log if "nats_permission_violation" in line]


def order(arms: tuple[str, ...], n: int) -> tuple[str, ...]:
    """Round ``n``'s order: the arms rotated by ``n``, so each goes first (and last) in turn."""
    k = n % len(arms)
    return arms[k:] + arms[:k]


async def measure(args) -> tuple[list[dict], list[str]]:
    """The arms in turn, their order rotated each round, against one mock (and one Globus double)."""
    runs, violations = [], []
    mock_proc, engine_url = await rp.start_mock()
    try:
        async with contextlib.AsyncExitStack() as resources:
            globus = None
            if "globus" in args.arms:
                globus = Globus(await resources.enter_async_context(GlobusDouble()))
            tmp = resources.enter_context(tempfile.TemporaryDirectory(prefix="bench-auth-"))
            for n in range(args.rounds):
                for arm in order(args.arms, n):
                    (folder := Path(tmp) / f"{arm}-{n}").mkdir()
                    found, seen = await one_arm(arm, folder, engine_url, args, mock_proc.pid, globus)
                    runs += [dict(r, round=n) for r in found]
                    violations += seen
    finally:
        await rp.stop(mock_proc)
    return runs, violations


def _spread(values) -> dict:
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict], arms: tuple[str, ...] = ARMS) -> dict:
    """Medians (and ranges) over the rounds, by arm and clients, and each arm's two verdicts against
    ``off`` (none without an ``off`` arm)."""
    rows = {}
    for arm in arms:
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
    # The arms of one round run back to back: their ratio is the paired one, free of slow drifts.
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["clients"] == many:
            by_round.setdefault(r["round"], {})[r["arm"]] = r["req_per_s"]
    verdict = {}
    for arm in arms if "off" in arms else ():
        if arm == "off":
            continue
        added = rows[f"{arm}/{one}"]["p50_ms"]["median"] - rows[f"off/{one}"]["p50_ms"]["median"]
        ratio = rows[f"{arm}/{many}"]["req_per_s"]["median"] / rows[f"off/{many}"]["req_per_s"]["median"]
        paired = _spread(v[arm] / v["off"] for v in by_round.values() if arm in v and "off" in v)
        verdict[arm] = {"added_p50_ms_1": added, "added_p50_met": added <= TARGET_ADDED_P50_MS,
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
        f"{'arm':<6} {'clients':>7} {'req/s':>17} {'p50 ms':>19} {'p99 ms':>7} {'stack CPU ms/req':>21} {'other load':>16}",
    ]
    for row in summary["rows"].values():
        out.append(
            f"{row['arm']:<6} {row['clients']:>7} {cell(row['req_per_s'], '{:.0f}'):>17}"
            f" {cell(row['p50_ms'], '{:.2f}'):>19} {row['p99_ms']['median']:7.2f}"
            f" {cell(row['stack_cpu_ms_per_req'], '{:.3f}'):>21} {cell(row['other_cores'], '{:.2f}'):>16}"
        )
    out.append("")
    if not summary["verdict"]:
        out.append("no off arm: no targets (each is against off)")
    for arm, v in summary["verdict"].items():
        out += [
            f"added p50 at 1 client, {arm}: {v['added_p50_ms_1']:+.3f} ms (target <= {TARGET_ADDED_P50_MS} ms)"
            f" {'met' if v['added_p50_met'] else 'MISSED'}",
            f"req/s at 64 clients: {arm}/off = {v['req_per_s_ratio_64']:.3f} (target >= {TARGET_RATIO_64:.2f})"
            f" {'met' if v['req_per_s_ratio_met'] else 'MISSED'}",
            "  the same, round by round: median {median:.3f} (min {min:.3f}, max {max:.3f})".format(
                **v["req_per_s_ratio_64_paired"]
            ),
        ]
    return "\n".join(out)


def introspections(runs: list[dict]) -> str:
    """The ``globus`` arm's line: the double's introspections during its measured rows, by arm run.
    Anything but 0 means the rows did not measure a cached token."""
    mine = [r for r in runs if r["arm"] == "globus"]
    by_round: dict[int, int] = {}
    for r in mine:
        by_round[r["round"]] = by_round.get(r["round"], 0) + r["introspections"]
    cached = "a cached token" if not any(by_round.values()) else "NOT only a cached token"
    return (f"globus: Globus introspections during the measured rows, by arm run:"
            f" {', '.join(map(str, by_round.values()))} ({sum(r['requests'] for r in mine)} requests; {cached})")  # fmt: skip


def arms_option(text: str) -> tuple[str, ...]:
    named = [a.strip() for a in text.split(",") if a.strip()]
    if not named or set(named) - set(ARMS):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(ARMS)}")
    return tuple(a for a in ARMS if a in named)  # in ARMS's order, each once


async def _load(url: str, clients: int, seconds: float, warmup: float, key: str) -> None:
    """The ``load`` child: bench.loadgen's run, with the key's (or token's) header in its request."""
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
    parser.add_argument("--arms", type=arms_option, default=ARMS,
                        help=f"the arms to run, comma-separated (default: {','.join(ARMS)})")  # fmt: skip
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    started = time.monotonic()
    runs, violations = asyncio.run(measure(args))
    meta = {"cores": os.cpu_count(), "seconds": args.seconds, "warmup": args.warmup,
            "rounds": args.rounds, "arms": list(args.arms), "wall_s": time.monotonic() - started,
            "python": sys.version.split()[0]}  # fmt: skip
    summary = summarise(runs, args.arms)
    print(table(summary, meta))
    if "globus" in args.arms:
        print(introspections(runs))
    if violations:
        print(f"\n{len(violations)} nats_permission_violation lines in the stacks' logs:")
        print("\n".join(violations[:20]))
    if args.json:
        document = {"meta": meta, "runs": runs, **summary, "permission_violations": violations}
        Path(args.json).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
