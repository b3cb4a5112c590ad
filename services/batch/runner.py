"""One batch from its record's state to the end: check and queue its lines, run them through the
request path at batch priority, write its output files, and say so in its record.

Every step can be cut off (SIGKILL) and run again from the record: validation starts over
(nothing of it ran yet); running picks up the lines JetStream still holds, and a line that was
answered but not acknowledged is not run again (its result is there); finalizing writes the files
again from the results, which stay until the record says the batch is done.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

import msgspec
import nats.errors
import structlog

from services.batch import lines as batch_lines
from services.batch.output import write_outputs
from services.batch.queues import Queues
from shared import batchstore, errors, schema
from shared.batchstore import Batches, Files
from shared.client import FirstClient, new_id
from shared.config import BatchConfig
from shared.events import EventPublisher

_FETCH_WAIT_S = 1.0
_ENQUEUE_WINDOW = 2048  # queued lines whose acknowledgement may be outstanding
_RETRY_DELAY_S = 2.0
_MAX_DELIVERIES = 20
_RECOUNT_S = 30.0  # a line refused for capacity this often fails with its last error


class Stop(Exception):
    """The batch leaves the running state: cancelled or expired."""

    def __init__(self, status: schema.BatchStatus):
        self.status = status


class Runner:
    def __init__(
        self,
        key: str,
        *,
        batches: Batches,
        files: Files,
        queues: Queues,
        client: FirstClient,
        slots: asyncio.Semaphore,
        events: EventPublisher,
        config: BatchConfig,
    ):
        self.key, self.batches, self.files, self.queues = key, batches, files, queues
        self.client, self.slots, self.events, self.config = client, slots, events, config
        self.record: schema.BatchRecord | None = None
        self.completed = self.failed = self.total = 0
        self.validated = False  # every line of the file is queued or has its result
        self._answered = bytearray()  # a bit per line: its result is stored and counted
        self._stop: schema.BatchStatus | None = None  # set by cancel() or expire()
        self._running: dict[asyncio.Task, object] = {}  # a line's task -> its JetStream message
        self._log = structlog.get_logger().bind(batch_key=key)

    # --- asked from outside --------------------------------------------------------------------

    def stop_with(self, status: schema.BatchStatus) -> None:
        """Stop dispatching now; the lines on their way are cancelled; then the files are written."""
        if self._stop is None:
            self._stop = status
            for task in self._running:
                task.cancel()

    # --- the whole run -------------------------------------------------------------------------

    async def run(self) -> None:
        record = await self.batches.get(self.key)
        if record is None or record.status in batchstore.FINAL:
            return
        self.record = record
        with structlog.contextvars.bound_contextvars(batch_id=record.id):
            if record.status in ("validating", "in_progress"):
                await self._count_results(record.id)
                # Lines run as soon as they are queued, while the rest of the file is checked.
                lines = asyncio.create_task(self._run_lines(record), name=f"batch-lines-{record.id}")
                try:
                    if record.status == "validating":
                        if not (self.completed or self.failed):
                            await self.events.emit(
                                "batch", "created", user=record.owner, model=record.model, batch_id=record.id,
                                input_file_id=record.input_file_id, endpoint=record.endpoint,
                            )  # fmt: skip
                        await self._validate(record)
                    else:
                        self.validated, self.total = True, record.total
                    await lines
                finally:
                    if not lines.done():
                        lines.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await lines
                if self._stop == "failed":
                    return
            record = self.record
            if record.status == "cancelling" or self._stop == "cancelled":
                await self._finish(record, "cancelled")
            elif self._stop == "expired" or record.status == "expired":
                await self._finish(record, "expired")
            elif record.status in ("in_progress", "finalizing"):
                await self._finish(record, "completed")

    async def _count_results(self, bid: str) -> None:
        """What ran before a restart: the counts, and which lines have their result."""
        self.completed = self.failed = 0
        self._answered = bytearray()
        async for result in self.queues.read(bid):
            self._mark(result.line, result.ok)

    def _has(self, line: int) -> bool:
        byte = line >> 3
        return byte < len(self._answered) and bool(self._answered[byte] & (1 << (line & 7)))

    def _mark(self, line: int, ok: bool) -> None:
        """Count a line's stored result, once whoever stored it and however often it is seen."""
        if self._has(line):
            return
        byte = line >> 3
        if byte >= len(self._answered):
            self._answered.extend(bytes(byte + 1 - len(self._answered) + 1024))
        self._answered[byte] |= 1 << (line & 7)
        if ok:
            self.completed += 1
        else:
            self.failed += 1

    async def _stored(self, bid: str, result: schema.BatchResult) -> None:
        """Store a line's result, or find the one stored before (another run of it), and count it."""
        if await self.queues.record(bid, result):
            self._mark(result.line, result.ok)
        elif (earlier := await self.queues.stored(bid, result.line)) is not None:
            self._mark(earlier.line, earlier.ok)

    # --- validating ----------------------------------------------------------------------------

    async def _validate(self, record: schema.BatchRecord) -> None:
        """Check every line, queue the good ones, record the bad ones as their results. After a
        restart, lines with a result are not queued again, and those queued before are stored
        once (JetStream drops a message id it has seen within its duplicate window)."""
        bid = record.id
        try:
            upload, info = await self.files.info(record.input_file_id)
        except batchstore.FileNotFound:
            await self._fail(record, "file_not_found", f"The input file {record.input_file_id} is gone.")
            return
        checker = batch_lines.Checker(record.endpoint, record.model)
        acks: collections.deque = collections.deque()
        async for number, raw in self.files.lines(info):
            if self._stop is not None:
                break
            if not raw.strip():
                continue  # blank lines (a trailing newline, say) are not requests
            self.total += 1
            try:
                line = checker.check(number, raw)
            except batch_lines.LineError as exc:
                if not self._has(number):
                    await self._stored(
                        bid, schema.BatchResult(number, False, batch_lines.invalid(number, exc))
                    )
                continue
            if self._has(number):
                continue
            acks.append(await self.queues.enqueue(bid, line))
            while len(acks) > _ENQUEUE_WINDOW:
                await acks.popleft()
        for ack in acks:
            await ack
        if self._stop is not None:
            return
        if self.total == 0:
            await self._fail(record, "empty_file", "The input file has no request lines.")
            return
        if self.failed == self.total and not self.completed:
            await self._fail(
                record,
                "invalid_file",
                f"None of the {self.total} lines is a valid request; see the error file.",
                errors_file=True,
            )
            return
        total = self.total

        def running(r: schema.BatchRecord) -> schema.BatchRecord | None:
            if r.status != "validating":
                return None
            return msgspec.structs.replace(
                r, status="in_progress", in_progress_at=batchstore.now(), total=total
            )

        self.record = await self.batches.update(self.key, running) or record
        self.validated = True
        await self.events.emit(
            "batch", "progress", user=record.owner, batch_id=bid, status="in_progress", total=total
        )
        self._log.info("batch_validated", lines=total, invalid=self.failed, file_bytes=upload.bytes)

    async def _fail(
        self, record: schema.BatchRecord, code: str, message: str, *, errors_file: bool = False
    ) -> None:
        error_file = ""
        if errors_file:
            _, error_file = await write_outputs(self.files, self.queues, record, with_output=False)

        def failed(r: schema.BatchRecord) -> schema.BatchRecord:
            return msgspec.structs.replace(
                r, status="failed", failed_at=batchstore.now(), errors=[schema.BatchError(code, message)],
                error_file_id=error_file, total=self.total, failed=self.failed, completed=0,
            )  # fmt: skip

        self._stop = "failed"
        self.record = await self.batches.update(self.key, failed) or record
        await self.queues.drop_lines(record.id)
        await self.queues.drop_results(record.id)
        await self.events.emit("batch", "failed", user=record.owner, batch_id=record.id, reason=message)
        self._log.info("batch_failed", code=code, reason=message)

    # --- running -------------------------------------------------------------------------------

    async def _run_lines(self, record: schema.BatchRecord) -> None:
        bid = record.id
        sub = await self.queues.consumer(bid)
        progress = asyncio.create_task(self._progress(), name=f"batch-progress-{bid}")
        keepalive = asyncio.create_task(self._keepalive(), name=f"batch-keepalive-{bid}")
        fetched: collections.deque = collections.deque()  # handed to us, not yet started
        recount_at = time.monotonic() + _RECOUNT_S
        try:
            while self._stop is None and not (self.validated and self.completed + self.failed >= self.total):
                if time.time() >= record.expires_at:
                    self.stop_with("expired")
                    break
                await self.slots.acquire()
                try:
                    want = max(1, min(64, self.config.max_in_flight - len(self._running)))
                    fetched.extend(await sub.fetch(want, timeout=_FETCH_WAIT_S))
                except (nats.errors.TimeoutError, TimeoutError):
                    if self.validated and not self._running and time.monotonic() >= recount_at:
                        # Nothing left to take, yet not every line is counted: results another
                        # service stored (before it lost the lease) are counted from the stream.
                        recount_at = time.monotonic() + _RECOUNT_S
                        await self._count_results(bid)
                    continue
                finally:
                    self.slots.release()
                while fetched and self._stop is None:
                    await self.slots.acquire()
                    msg = fetched.popleft()
                    task = asyncio.create_task(self._one(record, msg))
                    self._running[task] = msg
                    task.add_done_callback(self._done)
        except asyncio.CancelledError:
            # The service is stopping: the lines on their way are given back (and the consumer
            # is made anew at the next start, so none waits out ack_wait_s).
            for task in list(self._running):
                task.cancel()
            raise
        finally:
            for msg in fetched:
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak()
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
            for task in (progress, keepalive):
                task.cancel()
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        await self._save_progress()

    def _done(self, task: asyncio.Task) -> None:
        self._running.pop(task, None)
        self.slots.release()
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("batch_line_failed", error=repr(exc))

    async def _one(self, record: schema.BatchRecord, msg) -> None:
        bid = record.id
        try:
            line = schema.batch_line_decoder.decode(msg.data)
        except msgspec.DecodeError:
            await msg.term()  # not ours
            return
        if self._has(line.line):
            await msg.ack()  # answered before a restart: once is enough
            return
        if msg.metadata.num_delivered > 1 and (earlier := await self.queues.stored(bid, line.line)):
            self._mark(earlier.line, earlier.ok)
            await msg.ack()
            return
        request_id = new_id()
        try:
            result = await self.client.complete(
                line.model, line.endpoint, line.body, request_id=request_id,
                identity=record.identity, cluster=record.cluster, priority="batch",
            )  # fmt: skip
            outcome = schema.BatchResult(line.line, True, batch_lines.answered(line, request_id, result))
        except errors.FirstError as exc:
            if exc.status in (503, 504) and msg.metadata.num_delivered < _MAX_DELIVERIES:
                await msg.nak(delay=_RETRY_DELAY_S)  # no capacity yet: the line waits its turn again
                return
            outcome = schema.BatchResult(line.line, False, batch_lines.refused(line, request_id, exc))
        except asyncio.CancelledError:
            if self._stop is None:  # the service is stopping: the line runs after its restart
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak()
            raise
        await self._stored(bid, outcome)
        await msg.ack()

    async def _keepalive(self) -> None:
        """Lines still on their way are not handed out again while this service lives."""
        while True:
            await asyncio.sleep(self.config.ack_wait_s / 3)
            for msg in list(self._running.values()):
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.config.progress_s)
            try:
                await self._save_progress()
            except Exception:
                self._log.exception("batch_progress_not_saved")

    async def _save_progress(self) -> None:
        record = self.record
        counts = (self.completed, self.failed, self.total)

        def counted(r: schema.BatchRecord) -> schema.BatchRecord | None:
            if (r.completed, r.failed, r.total) == counts or r.status in batchstore.FINAL:
                return None
            return msgspec.structs.replace(r, completed=counts[0], failed=counts[1], total=counts[2])

        if (new := await self.batches.update(self.key, counted)) is not None:
            if new.status == "cancelling":
                self.stop_with("cancelled")
            self.record = new
        await self.events.emit(
            "batch", "progress", user=record.owner, batch_id=record.id, total=record.total,
            completed=self.completed, failed=self.failed,
        )  # fmt: skip

    # --- the end -------------------------------------------------------------------------------

    async def _finish(self, record: schema.BatchRecord, status: schema.BatchStatus) -> None:
        """Write the output and error files from the results, then the record says ``status``."""
        bid = record.id
        if status != "completed":
            await self.queues.drop_lines(bid)  # stop: nothing of it runs any more

        def finalizing(r: schema.BatchRecord) -> schema.BatchRecord | None:
            if r.status in batchstore.FINAL:
                return None
            stamp = {"finalizing_at": batchstore.now()} if status == "completed" else {}
            if status == "cancelled" and r.cancelling_at is None:
                stamp["cancelling_at"] = batchstore.now()
            nxt = {"completed": "finalizing", "cancelled": "cancelling", "expired": "finalizing"}[status]
            return msgspec.structs.replace(r, status=nxt, **stamp)

        record = await self.batches.update(self.key, finalizing) or record
        if record.status in batchstore.FINAL:
            return
        completed = failed = 0
        async for result in self.queues.read(bid):
            completed, failed = completed + result.ok, failed + (not result.ok)
        output_file, error_file = await write_outputs(self.files, self.queues, record)
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[status]

        def done(r: schema.BatchRecord) -> schema.BatchRecord:
            return msgspec.structs.replace(
                r, status=status, output_file_id=output_file, error_file_id=error_file,
                completed=completed, failed=failed, **{stamp: batchstore.now()},
            )  # fmt: skip

        self.record = await self.batches.update(self.key, done) or record
        await self.queues.drop_lines(bid)
        await self.queues.drop_results(bid)
        await self.events.emit(
            "batch", status, user=record.owner, batch_id=bid, total=record.total, completed=completed,
            failed=failed, output_file_id=output_file, error_file_id=error_file,
        )  # fmt: skip
        self._log.info("batch_done", status=status, completed=completed, failed=failed)
