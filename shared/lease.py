"""One of several acts at a time: a lease under the key ``lease`` in a KV bucket (the scaler's, so
one scaler starts and releases nodes; the batches bucket, so one batch service runs batches).

The holder renews it with a revision-checked update (``update(last=revision)``), so of two scalers
that both think they hold it, the second writer fails and stands down. A standby watches the
lease's revision: once it has not moved for ``ttl_s`` (measured on the standby's own clock, so
the hosts' clocks need not agree) the holder is taken to be dead, and the standby takes the lease
with a revision-checked update of the revision it saw, which at most one standby wins. A holder
that stops in order hands the lease back (an empty holder), and a standby takes it at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.kv import KeyValue

from shared import schema

KEY = "lease"


class Lease:
    """``service`` names the log lines (``scaler_lease_taken``) and the holders in them."""

    def __init__(
        self,
        kv: KeyValue,
        holder: str,
        ttl_s: float,
        *,
        service: str = "scaler",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.kv, self.holder, self.ttl_s, self.clock = kv, holder, ttl_s, clock
        self.service = service
        self.held = False
        self._revision = 0  # ours, while held
        self._renewed = 0.0  # when it was last written by us
        self._seen: tuple[int, float] = (0, 0.0)  # a standby's view: (revision, since when)
        self._log = structlog.get_logger().bind(service=service, holder=holder)

    def _value(self, holder: str) -> bytes:
        return schema.encode(schema.Lease(holder=holder, ttl_s=self.ttl_s, sent=time.time()))

    async def keep(self) -> bool:
        """Take the lease if it is free or its holder is dead, or renew ours when due. Whether we
        hold it now. NATS trouble counts against a holder: past ``ttl_s`` without a renewal it
        stands down, as a standby will by then have taken over."""
        try:
            if self.held:
                if self.clock() - self._renewed >= self.ttl_s / 3:
                    await self._renew()
            else:
                await self._try_take()
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            self._log.warning(f"{self.service}_lease_unreachable", error=repr(exc))
            if self.held and self.clock() - self._renewed > self.ttl_s:
                self._lost("not renewed within its ttl")
        return self.held

    async def _renew(self) -> None:
        try:
            self._revision = await self.kv.update(KEY, self._value(self.holder), last=self._revision)
            self._renewed = self.clock()
        except nats.js.errors.KeyWrongLastSequenceError:
            self._lost(f"another {self.service} took it")

    async def _try_take(self) -> None:
        now = self.clock()
        try:
            entry = await self.kv.get(KEY)
        except nats.js.errors.KeyNotFoundError:
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                self._took(await self.kv.create(KEY, self._value(self.holder)), f"no {self.service} held it")
            return
        try:
            current = schema.lease_decoder.decode(entry.value or b"")
            holder = current.holder
        except msgspec.DecodeError:
            holder = "?"  # garbage: treat as held, and take it once it stops moving
        revision = entry.revision or 0
        if revision != self._seen[0]:
            self._seen = (revision, now)
        stale = now - self._seen[1] >= self.ttl_s
        if holder and holder != self.holder and not stale:
            return
        why = "handed back" if not holder else f"{holder} stopped renewing it"
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
            self._took(await self.kv.update(KEY, self._value(self.holder), last=revision), why)

    def _took(self, revision: int, why: str) -> None:
        self.held, self._revision, self._renewed = True, revision, self.clock()
        self._log.info(f"{self.service}_lease_taken", reason=why)

    def _lost(self, why: str) -> None:
        self.held = False
        self._seen = (0, 0.0)
        self._log.warning(f"{self.service}_lease_lost", reason=why)

    async def hand_back(self) -> None:
        """An orderly stop: an empty holder, so a standby takes over without waiting out the ttl."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await self.kv.update(KEY, self._value(""), last=self._revision)
