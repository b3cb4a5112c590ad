"""The batch service: runs every batch that is not done, one Runner each, lines through the same
request path as the gateway's (FirstClient, at batch priority).

Its own service rather than part of the gateway or the router: a batch outlives any HTTP request,
runs for hours at a pace of its own, and must resume after a restart, and none of that should
share a fate with the interactive path (a gateway restarted for a config change, a router
failing over). The state is all in JetStream (shared/batchstore.py), so the service can be
killed at any moment and a restarted one carries on; ``first up`` runs one.

It learns of new and cancelled batches from the gateway's BatchChanged nudge, and rescans the
batches bucket every few seconds, so a nudge lost while it was down only delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from services.batch.queues import Queues
from services.batch.runner import Runner
from shared import batchstore, schema
from shared.batchstore import Batches, Files
from shared.client import FirstClient, LocalRouter
from shared.config import Config
from shared.events import EventPublisher
from shared.lease import KEY as LEASE_KEY
from shared.lease import Lease
from shared.lifecycle import Lifecycle
from shared.subjects import Subjects
from shared.supervise import every, guarded

SCAN_S = 2.0


class BatchService(Lifecycle):
    def __init__(
        self, nc: NATS, subjects: Subjects, config: Config, *, local_router: LocalRouter | None = None
    ):
        self.nc, self.subjects, self.config = nc, subjects, config
        self.client = FirstClient(
            nc,
            subjects,
            request_timeout_s=config.batch.request_timeout_s,
            stall_timeout_s=config.gateway.stall_timeout_s,
            missed_heartbeats=config.router.missed_heartbeats,
            local_router=local_router,
        )
        self.events = EventPublisher(nc, subjects, "batch")
        self.slots = asyncio.Semaphore(config.batch.max_in_flight)
        self.runners: dict[str, tuple[Runner, asyncio.Task]] = {}
        self.files: Files | None = None
        self.batches: Batches | None = None
        self.queues = Queues(nc, subjects, config)
        self.instance = f"batch-{secrets.token_hex(4)}"
        self.lease: Lease | None = None
        self._sub = None
        self._scan: asyncio.Task | None = None
        self._log = structlog.get_logger()

    async def start(self) -> None:
        if self._sub is not None:
            return
        self.files = await Files.open(self.nc, self.config)
        self.batches = await Batches.open(self.nc, self.config)
        self.lease = Lease(self.batches.kv, self.instance, self.config.batch.lease_ttl_s, service="batch")
        await self.queues.ensure()
        await self.client.start()
        self._sub = await self.nc.subscribe(self.subjects.batch_changed, cb=self._on_changed)
        self._scan = asyncio.create_task(every(SCAN_S, self.scan, name="batch-scan"), name="batch-scan")
        self._log.info(
            "batch_service_started", instance=self.instance, max_in_flight=self.config.batch.max_in_flight
        )

    async def stop(self) -> None:
        """Stop every runner where it is (their batches resume at the next start)."""
        if self._sub is None:
            return
        sub, self._sub = self._sub, None
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
        if self._scan is not None:
            self._scan.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scan
        await self._stand_down()
        await self.lease.hand_back()
        await self.client.stop()

    async def _stand_down(self) -> None:
        """Stop every runner where it is: its lines in flight go back to the queue."""
        for _, task in list(self.runners.values()):
            task.cancel()
        for _, task in list(self.runners.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @guarded
    async def _on_changed(self, msg) -> None:
        try:
            changed = schema.batch_changed_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if self.lease.held:
            await self.reconcile(changed.key)

    async def scan(self) -> None:
        """Every batch not yet ended has its runner, while this service holds the lease."""
        if not await self.lease.keep():
            if self.runners:
                self._log.warning("batch_service_standing_by", runners=len(self.runners))
                await self._stand_down()
            return
        for key in await self.batches.keys():
            if key != LEASE_KEY:
                await self.reconcile(key)

    async def reconcile(self, key: str) -> None:
        """Bring the batch under ``key`` and its runner in line."""
        if key in self.runners:
            runner, _ = self.runners[key]
            record = await self.batches.get(key)
            if record is None:
                return
            if record.status == "cancelling":
                runner.stop_with("cancelled")
            elif record.status in ("validating", "in_progress") and batchstore.now() >= record.expires_at:
                runner.stop_with("expired")
            return
        record = await self.batches.get(key)
        if record is None or record.status not in batchstore.ACTIVE:
            return
        runner = Runner(
            key, batches=self.batches, files=self.files, queues=self.queues, client=self.client,
            slots=self.slots, events=self.events, config=self.config.batch,
        )  # fmt: skip
        if record.status in ("validating", "in_progress") and batchstore.now() >= record.expires_at:
            runner.stop_with("expired")
        task = asyncio.create_task(self._run(key, runner), name=f"batch-{record.id}")
        self.runners[key] = (runner, task)

    async def _run(self, key: str, runner: Runner) -> None:
        try:
            await runner.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The next scan starts it again from its record.
            self._log.exception("batch_runner_failed", batch_key=key)
        finally:
            self.runners.pop(key, None)
