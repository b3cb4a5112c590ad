"""Child processes that stop with their parent, and only when the parent says so.

The embedded nats-server, worker nodes and engine servers run in sessions of their own, so a
Ctrl-C on the terminal reaches only the parent, which then stops them in order (workers drain
while NATS still carries their answers). On Linux they also get SIGTERM if the parent dies
without that chance (kill -9), instead of lingering.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_process_options() -> dict[str, Any]:
    """Keyword arguments for ``asyncio.create_subprocess_exec``."""
    options: dict[str, Any] = {"start_new_session": True}
    if sys.platform == "linux":
        options["preexec_fn"] = _die_with_parent
    return options


def detached_process_options() -> dict[str, Any]:
    """For a child that must outlive its parent (the scaler's local worker nodes: a scaler that
    dies leaves them serving, and the next one adopts them): a session of its own, no death
    signal. Its parent stops it explicitly, on an orderly shutdown."""
    return {"start_new_session": True}


async def stop_process(proc: asyncio.subprocess.Process | None, *, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace_s``; waits for the exit either way."""
    if proc is None or proc.returncode is not None:
        return
    proc.terminate()
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
