"""Background work that never dies silently: guarded NATS callbacks, loops that log and carry on.

A service that looks alive while a loop inside it has died is the worst failure mode, so every
long-lived loop and every NATS callback goes through one of these.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

import structlog


def guarded(handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Wrap a NATS message callback (a method): an unexpected exception is logged with the subject,
    and the subscription goes on with the next message."""

    @functools.wraps(handler)
    async def run(self, msg) -> None:
        try:
            await handler(self, msg)
        except Exception:
            structlog.get_logger().exception("handler_failed", handler=handler.__name__, subject=msg.subject)

    return run


async def every(interval_s: float, step: Callable[[], Awaitable[None]], *, name: str) -> None:
    """Run ``step`` every ``interval_s`` until cancelled; a step that raises is logged, not fatal."""
    log = structlog.get_logger()
    while True:
        try:
            await step()
        except Exception:
            log.exception("loop_step_failed", loop=name)
        await asyncio.sleep(interval_s)


class Throttle:
    """Say yes once per key per ``period_s``: for log lines about input that may repeat forever
    (a worker sending malformed heartbeats twice a second)."""

    def __init__(self, period_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.period_s, self.clock = period_s, clock
        self._last: dict[str, float] = {}

    def __call__(self, key: str) -> bool:
        now = self.clock()
        if now - self._last.get(key, -self.period_s) < self.period_s:
            return False
        if len(self._last) > 10_000:  # bounded, whatever the input
            self._last.clear()
        self._last[key] = now
        return True
