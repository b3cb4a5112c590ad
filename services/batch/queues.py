"""The batch service's two streams: the lines still to run (a work queue, one durable consumer
per batch) and each line's one result (one subject per line, at most one message each, so a line
answered twice, by a service that died before its acknowledgement, is stored once)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api

from shared import batchstore, schema
from shared import config as cfg
from shared.replicas import bring_in_line, create_store
from shared.subjects import Subjects

_READ_BATCH = 256
_MAX_LINE_BYTES = 8 << 20  # a line's body; the NATS server's max_payload is the real bound
# JetStream's refusal of a second message on a line's result subject (DiscardNewPerSubject).
_PER_SUBJECT_FULL = 10077
_MSG_ID = api.Header.MSG_ID.value
# A validation cut off and run again queues its lines again: within this window, JetStream stores
# each once (a line queued twice past it runs twice, and its result is still stored once).
_LINES_DUPLICATE_WINDOW_S = 600.0


class Queues:
    def __init__(self, nc: NATS, subjects: Subjects, config: cfg.Config):
        self.js = nc.jetstream(timeout=batchstore.API_TIMEOUT_S)
        self.subjects, self.config = subjects, config
        self.lines = batchstore.lines_stream(config)
        self.results = batchstore.results_stream(config)

    async def ensure(self) -> None:
        """Both streams exist (created on first start; their config is ours alone), with
        nats.jetstream_replicas copies."""
        max_age = self.config.batch.retention_days * batchstore.DAY_S
        replicas = self.config.nats.jetstream_replicas
        wanted = [
            api.StreamConfig(
                name=self.lines,
                description="FIRST batch lines waiting to run",
                subjects=[self.subjects.batch_lines_all],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                max_age=max_age,
                max_msg_size=_MAX_LINE_BYTES,
                duplicate_window=_LINES_DUPLICATE_WINDOW_S,
                num_replicas=replicas,
            ),
            api.StreamConfig(
                name=self.results,
                description="FIRST batch results until written to the output files",
                subjects=[self.subjects.batch_results_all],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=max_age,
                max_msgs_per_subject=1,
                discard=api.DiscardPolicy.NEW,
                discard_new_per_subject=True,
                duplicate_window=120.0,
                num_replicas=replicas,
            ),
        ]
        for config in wanted:
            try:
                await create_store(
                    lambda n, config=config: self.js.add_stream(dataclasses.replace(config, num_replicas=n)),
                    replicas,
                    store=f"stream {config.name}",
                )
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # exists with another config: keep the operator's, copies aside
                    raise batchstore.StoreError(f"stream {config.name}: {exc.description}") from None
                await bring_in_line(self.js, config.name, replicas, store=f"stream {config.name}")

    # --- lines ---------------------------------------------------------------------------------

    async def enqueue(self, batch_id: str, line: schema.BatchLine):
        """Queue a line; returns the future of JetStream's acknowledgement (many go at once)."""
        return await self.js.publish_async(
            self.subjects.batch_lines(batch_id),
            schema.encode(line),
            headers={_MSG_ID: f"{batch_id}:{line.line}"},
        )

    async def consumer(self, batch_id: str):
        """The batch's durable pull subscription: where it stopped, across restarts."""
        config = api.ConsumerConfig(
            durable_name=batch_id,
            filter_subject=self.subjects.batch_lines(batch_id),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.config.batch.ack_wait_s,
            max_ack_pending=self.config.batch.max_in_flight * 2,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        # Made anew: lines handed to a service that died (or stopped) are at once there to take
        # again, not after ack_wait_s. Only the lease holder runs batches, so none is in use.
        try:
            await self.js.delete_consumer(self.lines, batch_id)
        except nats.js.errors.NotFoundError:
            pass
        await self.js.add_consumer(self.lines, config)
        return await self.js.pull_subscribe_bind(durable=batch_id, stream=self.lines)

    async def drop_lines(self, batch_id: str) -> None:
        """Forget the batch's queue: its consumer and the lines not yet run."""
        try:
            await self.js.delete_consumer(self.lines, batch_id)
        except nats.js.errors.NotFoundError:
            pass
        await self.js.purge_stream(self.lines, subject=self.subjects.batch_lines(batch_id))

    # --- results -------------------------------------------------------------------------------

    async def record(self, batch_id: str, result: schema.BatchResult) -> bool:
        """Store a line's result; False if it already had one."""
        try:
            await self.js.publish(self.subjects.batch_result(batch_id, result.line), schema.encode(result))
        except nats.js.errors.APIError as exc:
            if exc.err_code == _PER_SUBJECT_FULL:
                return False
            raise
        return True

    async def stored(self, batch_id: str, line: int) -> schema.BatchResult | None:
        """The line's result, if it has one."""
        try:
            msg = await self.js.get_last_msg(self.results, self.subjects.batch_result(batch_id, line))
        except nats.js.errors.NotFoundError:
            return None
        try:
            return schema.batch_result_decoder.decode(msg.data or b"")
        except msgspec.DecodeError:
            return None

    async def read(self, batch_id: str) -> AsyncIterator[schema.BatchResult]:
        """Every result the batch has, in the order they came, a few hundred at a time."""
        sub = await self.js.pull_subscribe(
            self.subjects.batch_results(batch_id),
            stream=self.results,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True, num_replicas=1
            ),
        )
        try:
            pending = (await sub.consumer_info()).num_pending or 0
            while pending > 0:
                try:
                    msgs = await sub.fetch(min(pending, _READ_BATCH), timeout=batchstore.API_TIMEOUT_S)
                except (nats.errors.TimeoutError, TimeoutError):
                    pending = (await sub.consumer_info()).num_pending or 0
                    continue
                pending -= len(msgs)
                for msg in msgs:
                    try:
                        yield schema.batch_result_decoder.decode(msg.data)
                    except Exception:  # not ours: left out
                        continue
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass

    async def drop_results(self, batch_id: str) -> None:
        await self.js.purge_stream(self.results, subject=self.subjects.batch_results(batch_id))
