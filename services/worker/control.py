"""What ends a worker from outside its own process besides a signal: the scaler's WorkerControl on
the worker's control subject, and the walltime of the batch job it runs in.

Providers that cannot signal a node (Globus Compute) release it through the control subject; a
worker that knows its job's walltime drains ``walltime_margin_s`` before the scheduler kills it,
and says when in its heartbeats (``drain_at``) so the scaler can start a replacement in time.
Only the scaler may publish on the subject and only this worker reads it (shared/natsauth.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as NATS

from shared import schema
from shared.connect import unsubscribe
from shared.lifecycle import Lifecycle
from shared.subjects import Subjects
from shared.supervise import guarded


def drain_at(walltime_s: float | None, margin_s: float, *, started: float) -> float:
    """When (unix s) a worker started at ``started`` with this walltime begins to drain; 0: never."""
    if walltime_s is None:
        return 0.0
    return started + max(0.0, walltime_s - margin_s)


class Control(Lifecycle):
    """Calls ``end(action, reason)`` once: on a WorkerControl (``drain`` or ``stop``), or with
    ``drain`` at ``drain_at`` (unix s, 0: no walltime)."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        worker_id: str,
        end: Callable[[str, str], None],
        *,
        drain_at: float = 0.0,
    ):
        self.nc, self.subject, self.end = nc, subjects.worker_control(worker_id), end
        self.drain_at = drain_at
        self.action, self.reason = "", ""
        self._subs: list = []
        self._timer: asyncio.TimerHandle | None = None
        self._log = structlog.get_logger().bind(worker_id=worker_id)

    async def start(self) -> None:
        if self._subs:
            return
        self._subs.append(await self.nc.subscribe(self.subject, cb=self._on_control))
        if self.drain_at:
            delay = max(0.0, self.drain_at - time.time())
            self._timer = asyncio.get_running_loop().call_later(
                delay, self._ended, "drain", "the node's walltime is about to end"
            )

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await unsubscribe(self._subs)

    @guarded
    async def _on_control(self, msg) -> None:
        try:
            control = schema.worker_control_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self._log.warning("bad_control_message", size=len(msg.data))
            return
        self._ended(control.action, control.reason or "asked by the scaler")

    def _ended(self, action: str, reason: str) -> None:
        if self.action == "stop" or self.action == action:
            return  # a stop is final; a second drain adds nothing
        self.action, self.reason = action, reason
        self._log.info("worker_told_to_end", action=action, reason=reason[:200])
        self.end(action, reason)
