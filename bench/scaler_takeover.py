"""How long the hot model's nodes are without an acting scaler when it dies: two ``first scaler``
processes (one acting, one standing by) with the local provider and a hot model; the acting one is
SIGKILLed and the time until the standby logs ``scaler_acting`` is measured, for several lease
TTLs. Also checks, each round, that the standby adopted the node and started none.

    .venv/bin/python -m bench.scaler_takeover [--rounds 3] [--ttls 1,2,5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from shared.natsserver import EmbeddedNats
from tests.faults.test_scaler_restart import workers_of
from tests.processes import Fleet
from tests.support import eventually


async def one_round(nats_url: str, ttl: float) -> tuple[float, bool]:
    with tempfile.TemporaryDirectory(prefix="takeover-") as tmp:
        fleet = Fleet(Path(tmp), nats_url, f"b{uuid.uuid4().hex[:8]}")
        fleet.configure(
            [{"id": "m", "engine": {"kind": "sim"}, "clusters": ["a"], "scaling": {"min_hot": 1}}],
            scaler={"tick_s": 0.1, "lease_ttl_s": ttl},
        )
        await fleet.start()
        try:
            first = await fleet.first("scaler-a", "scaler")
            await eventually(lambda: first.events("node_process_started"), timeout=30)
            standby = await fleet.first("scaler-b", "scaler")
            await eventually(lambda: standby.events("scaler_started"), timeout=30)
            await asyncio.sleep(ttl)  # the standby has seen the lease move
            killed = first.kill()
            await eventually(lambda: standby.events("scaler_acting"), timeout=ttl + 30, interval=0.01)
            took = time.monotonic() - killed
            clean = len(standby.events("scaler_acting")[0]["adopted"]) == 1 and not standby.events(
                "node_request"
            )
            return took, clean
        finally:
            for pid in workers_of(fleet):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await fleet.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttls", default="1,2,5")
    args = parser.parse_args()
    print(f"{'lease_ttl_s':>11} {'rounds':>6} {'median s':>9} {'max s':>7}  adopted, none started")
    async with EmbeddedNats() as server:
        for ttl in (float(t) for t in args.ttls.split(",")):
            results = [await one_round(server.url, ttl) for _ in range(args.rounds)]
            times = [t for t, _ in results]
            print(
                f"{ttl:>11g} {len(times):>6} {statistics.median(times):>9.2f} {max(times):>7.2f}"
                f"  {all(ok for _, ok in results)}"
            )


if __name__ == "__main__":
    asyncio.run(main())
