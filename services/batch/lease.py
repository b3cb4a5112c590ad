"""One batch service runs batches at a time: a lease under the key ``lease`` in the batches bucket.

Two services running one batch would each count only the results they stored and neither would
see it end, and one could drop the results the other is writing out; so a second service (a
``first batch serve`` beside ``first up``'s, or a standby) waits. The protocol is the scaler's
(services/scaler/lease.py): the holder renews with a revision-checked update; a standby takes over
once the lease's revision has not moved for ``ttl_s`` on its own clock, with a revision-checked
update that at most one standby wins; an orderly stop hands it back at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
import structlog
from nats.js.kv import KeyValue

KEY = "lease"


class Lease:
    def __init__(
        self, kv: KeyValue, holder: str, ttl_s: float, *, clock: Callable[[], float] = time.monotonic
    ):
        self.kv, self.holder, self.ttl_s, self.clock = kv, holder, ttl_s, clock
        self.held = False
        self._revision = 0
        self._renewed = 0.0
        self._seen: tuple[int, float] = (0, 0.0)  # a standby's view: (revision, since when)
        self._log = structlog.get_logger().bind(service="batch", holder=holder)

    async def keep(self) -> bool:
        """Take the lease if it is free or its holder is dead, or renew ours when due; whether we
        hold it now. Past ``ttl_s`` without a renewal (NATS trouble) a holder stands down."""
        try:
            if self.held:
                if self.clock() - self._renewed >= self.ttl_s / 3:
                    await self._renew()
            else:
                await self._try_take()
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            self._log.warning("batch_lease_unreachable", error=repr(exc))
            if self.held and self.clock() - self._renewed > self.ttl_s:
                self._lost("not renewed within its ttl")
        return self.held

    async def _renew(self) -> None:
        try:
            self._revision = await self.kv.update(KEY, self.holder.encode(), last=self._revision)
            self._renewed = self.clock()
        except nats.js.errors.KeyWrongLastSequenceError:
            self._lost("another batch service took it")

    async def _try_take(self) -> None:
        now = self.clock()
        try:
            entry = await self.kv.get(KEY)
        except nats.js.errors.KeyNotFoundError:
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                self._took(await self.kv.create(KEY, self.holder.encode()), "no batch service held it")
            return
        holder = (entry.value or b"").decode(errors="replace")
        revision = entry.revision or 0
        if revision != self._seen[0]:
            self._seen = (revision, now)
        if holder and holder != self.holder and now - self._seen[1] < self.ttl_s:
            return
        why = "handed back" if not holder else f"{holder[:64]} stopped renewing it"
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
            self._took(await self.kv.update(KEY, self.holder.encode(), last=revision), why)

    def _took(self, revision: int, why: str) -> None:
        self.held, self._revision, self._renewed = True, revision, self.clock()
        self._log.info("batch_lease_taken", reason=why)

    def _lost(self, why: str) -> None:
        self.held, self._seen = False, (0, 0.0)
        self._log.warning("batch_lease_lost", reason=why)

    async def hand_back(self) -> None:
        """An orderly stop: an empty holder, so a standby takes over without waiting out the ttl."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await self.kv.update(KEY, b"", last=self._revision)
