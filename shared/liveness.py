"""Who holds my requests, and are they alive? A caller's view of the routers and workers it waits on.

A caller that waits on a router (it holds the request) or a worker (it runs it) subscribes to
that party's beat subject for as long as it waits, and gives the party up after
``missed_heartbeats`` intervals of silence. Liveness is watched, not inferred from a silent
answer stream: an engine may rightly be silent for minutes (a long prefill, its own queue).

A worker's beats (RunsBeat) also list the runs it holds. A run that is missing from two beats in
a row, while its caller still waits, has ended without its answer reaching the caller (the last
message went astray in a NATS outage, say): the caller learns that too, instead of waiting for a
timeout.

One subscription per watched party, shared by all the requests it holds and kept a little
while after the last one ends, so a busy worker costs one subscription, not one per request.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from shared import schema

LINGER_S = 30.0  # keep watching a party this long after its last request, in case another comes
MISSING_BEATS = 2  # a run absent from this many beats in a row is gone


@dataclass(slots=True)
class Watch:
    interval_s: float
    last_seen: float
    lists_runs: bool  # a worker's RunsBeat: check that each request's run is listed
    sub: object = None
    requests: dict[str, str] = field(default_factory=dict)  # request id -> its run key ("" if none)
    missing: dict[str, int] = field(default_factory=dict)  # request id -> beats it was absent from
    idle_since: float = 0.0


class Watches:
    def __init__(self, nc: NATS, missed_heartbeats: int, clock: Callable[[], float] = time.monotonic):
        self.nc, self.missed, self.clock = nc, missed_heartbeats, clock
        self._watches: dict[str, Watch] = {}

    async def hold(self, subject: str, interval_s: float, request_id: str, run: str = "") -> None:
        """``request_id`` now waits on the party beating on ``subject`` (a worker's runs subject when
        ``run`` names the run to look for); it was heard from just now."""
        now = self.clock()
        watch = self._watches.get(subject)
        if watch is None:
            watch = self._watches[subject] = Watch(interval_s, now, bool(run))
            watch.sub = await self.nc.subscribe(subject, cb=self._on_beat)
        watch.interval_s, watch.last_seen = interval_s, max(watch.last_seen, now)
        watch.requests[request_id] = run
        watch.missing.pop(request_id, None)

    def release(self, subject: str, request_id: str) -> None:
        watch = self._watches.get(subject)
        if watch is not None and watch.requests.pop(request_id, None) is not None:
            watch.missing.pop(request_id, None)
            if not watch.requests:
                watch.idle_since = self.clock()

    async def _on_beat(self, msg) -> None:
        watch = self._watches.get(msg.subject)
        if watch is None:
            return
        if not watch.lists_runs:
            watch.last_seen = self.clock()  # a router: any message will do
            return
        try:
            beat = schema.runs_beat_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return  # not a worker's beat: proves nothing
        watch.last_seen = self.clock()
        held = set(beat.runs)
        for request_id, run in watch.requests.items():
            if run in held:
                watch.missing.pop(request_id, None)
            else:
                watch.missing[request_id] = watch.missing.get(request_id, 0) + 1

    def resume(self) -> None:
        """Our own connection was down: nobody could be heard. Start every party's clock again."""
        now = self.clock()
        for watch in self._watches.values():
            watch.last_seen = now
            watch.missing.clear()

    async def sweep(self) -> list[tuple[str, list[str], str]]:
        """What is lost: (subject, request ids, why) for parties gone silent (their requests are
        released) and for runs a worker no longer lists. Idle subscriptions past their linger end."""
        now = self.clock()
        lost, idle = [], []
        for subject, watch in self._watches.items():
            if watch.requests and now - watch.last_seen > watch.interval_s * self.missed:
                lost.append((subject, list(watch.requests), "silent"))
                watch.requests, watch.missing = {}, {}
                watch.idle_since = now
            elif gone := [rid for rid, n in watch.missing.items() if n >= MISSING_BEATS]:
                lost.append((subject, gone, "run gone"))
                for rid in gone:
                    self.release(subject, rid)
            elif not watch.requests and now - watch.idle_since > LINGER_S:
                idle.append(subject)
        for subject in idle:
            await self._end(self._watches.pop(subject))
        return lost

    async def close(self) -> None:
        for watch in self._watches.values():
            await self._end(watch)
        self._watches.clear()

    @staticmethod
    async def _end(watch: Watch) -> None:
        with contextlib.suppress(nats.errors.Error):
            await watch.sub.unsubscribe()
