"""Where batch mode keeps its state in JetStream: what the gateway and the batch service share.

- Files (uploads and the output files batches write) in an Object Store bucket
  ``<prefix>_files``: one object per file id, its FileRecord as JSON in the object's description.
  Written and read in chunks as they come: no file is ever held whole in memory.
- Batches in a KV bucket ``<prefix>_batches``, key ``<owner key>.<batch id>``, a msgpack
  BatchRecord: a caller can only name (and so see) their own batches.
- Valid input lines in the work-queue stream ``<PREFIX>_BATCH_LINES`` (one subject per batch) and
  each line's one result in ``<PREFIX>_BATCH_RESULTS`` (one subject per line, which keeps at most
  one message: a line answered twice is stored once) until the output files are written.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import msgspec
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared import config as cfg
from shared import kvbucket, schema
from shared.replicas import bring_in_line, create_store
from shared.subjects import Subjects

API_TIMEOUT_S = 10.0
CHUNK_BYTES = 128 * 1024  # the Object Store's usual chunk size
DAY_S = 86_400.0
_READ_AHEAD = 4  # chunks fetched at once when reading a file
FINAL = frozenset({"failed", "completed", "expired", "cancelled"})
ACTIVE = frozenset({"validating", "in_progress", "finalizing", "cancelling"})


class StoreError(Exception):
    """JetStream could not do it; the message says what, in one line."""


def _why(exc: Exception) -> str:
    """What a JetStream failure means to an operator, in words."""
    if isinstance(exc, (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)):
        return "JetStream is not enabled on this NATS server (run nats-server with -js)"
    if isinstance(exc, nats.errors.TimeoutError):
        return "JetStream did not answer in time"
    return str(exc) or repr(exc)


class FileNotFound(StoreError):
    pass


def _base(config: cfg.Config) -> str:
    return config.nats.subject_prefix.replace(".", "_")


def files_bucket(config: cfg.Config) -> str:
    return f"{_base(config)}_files"


def batches_bucket(config: cfg.Config) -> str:
    return f"{_base(config)}_batches"


def lines_stream(config: cfg.Config) -> str:
    return f"{_base(config).upper()}_BATCH_LINES"


def results_stream(config: cfg.Config) -> str:
    return f"{_base(config).upper()}_BATCH_RESULTS"


def owner_key(user: str) -> str:
    """The KV key part naming a batch's owner: any user name, as a subject token."""
    return hashlib.sha256(user.encode()).hexdigest()[:24]


def batch_key(owner: str, batch_id: str) -> str:
    return f"{owner_key(owner)}.{batch_id}"


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


# --- files -------------------------------------------------------------------------------------


class Files:
    """The files bucket: put a file from chunks as they arrive, read it back by chunks or lines."""

    def __init__(self, js: JetStreamContext, store: ObjectStore, bucket: str):
        self.js, self.store, self.bucket = js, store, bucket
        self.stream = f"OBJ_{bucket}"

    @classmethod
    async def open(cls, nc: NATS, config: cfg.Config) -> Files:
        js = nc.jetstream(timeout=API_TIMEOUT_S)
        bucket = files_bucket(config)
        replicas = config.nats.jetstream_replicas
        try:
            try:
                store = await js.object_store(bucket)
                await bring_in_line(js, f"OBJ_{bucket}", replicas, store=f"object store {bucket}")
            except nats.js.errors.BucketNotFoundError:
                store = await create_store(
                    lambda n: js.create_object_store(
                        bucket,
                        api.ObjectStoreConfig(
                            bucket=bucket,
                            description="FIRST batch files: uploads and batch outputs",
                            ttl=config.batch.retention_days * DAY_S,
                            storage=api.StorageType.FILE,
                            replicas=n,
                        ),
                    ),
                    replicas,
                    store=f"object store {bucket}",
                )
        except (nats.js.errors.Error, nats.errors.Error) as exc:
            raise StoreError(f"object store {bucket}: {_why(exc)}") from None
        return cls(js, store, bucket)

    async def put(
        self,
        record: schema.FileRecord,
        chunks: AsyncIterator[bytes],
        check: Callable[[bytes], None] | None = None,
    ) -> schema.FileRecord:
        """Store the file from ``chunks`` as they come (``check`` sees each; it may raise to stop);
        the object becomes visible only once whole. Its size goes into the record."""
        nuid = self.js._nc._nuid.next().decode()
        chunk_subject = f"$O.{self.bucket}.C.{nuid}"
        digest, size, count, pending = hashlib.sha256(), 0, 0, bytearray()
        try:
            async for data in chunks:
                if check is not None:
                    check(data)
                pending += data
                while len(pending) >= CHUNK_BYTES:
                    piece = bytes(pending[:CHUNK_BYTES])
                    del pending[:CHUNK_BYTES]
                    digest.update(piece)
                    await self.js.publish(chunk_subject, piece)
                    size, count = size + len(piece), count + 1
            if pending:
                digest.update(pending)
                await self.js.publish(chunk_subject, bytes(pending))
                size, count = size + len(pending), count + 1
            record.bytes = size
            info = api.ObjectInfo(
                name=record.id,
                bucket=self.bucket,
                nuid=nuid,
                size=size,
                chunks=count,
                mtime=datetime.now(UTC).isoformat(),
                digest="SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode(),
                description=msgspec.json.encode(record).decode(),
                options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES),
            )
            meta_subject = f"$O.{self.bucket}.M.{_name_token(record.id)}"
            await self.js.publish(
                meta_subject, orjson.dumps(info.as_dict()), headers={api.Header.ROLLUP: "sub"}
            )
        except BaseException:
            try:
                await self.js.purge_stream(self.stream, subject=chunk_subject)
            except (nats.errors.Error, nats.js.errors.Error):
                pass  # the bucket's ttl removes them in the end
            raise
        return record

    async def info(self, file_id: str) -> tuple[schema.FileRecord, api.ObjectInfo]:
        try:
            info = await self.store.get_info(file_id)
        except nats.js.errors.ObjectNotFoundError:
            raise FileNotFound(f"No such file: {file_id}.") from None
        except nats.js.errors.NotFoundError:
            raise FileNotFound(f"No such file: {file_id}.") from None
        return _record(info), info

    async def list(self) -> list[schema.FileRecord]:
        out = []
        async for data in self._read(f"$O.{self.bucket}.M.>", api.DeliverPolicy.LAST_PER_SUBJECT):
            try:
                info = api.ObjectInfo.from_response(orjson.loads(data))
                if not info.deleted:
                    out.append(_record(info))
            except (orjson.JSONDecodeError, TypeError, KeyError, FileNotFound):
                continue  # an object someone else put there
        return out

    async def _read(
        self, subject: str, deliver: api.DeliverPolicy, count: int | None = None
    ) -> AsyncIterator[bytes]:
        """The messages of ``subject`` in the bucket's stream, a few at a time: ``count`` of
        them, or as many as there are when reading begins."""
        sub = await self.js.pull_subscribe(
            subject,
            stream=self.stream,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.NONE, deliver_policy=deliver, inactive_threshold=60.0,
                mem_storage=True, num_replicas=1,
            ),
        )  # fmt: skip
        try:
            left = count if count is not None else (await sub.consumer_info()).num_pending or 0
            while left > 0:
                try:
                    msgs = await sub.fetch(min(_READ_AHEAD, left), timeout=API_TIMEOUT_S)
                except (nats.errors.TimeoutError, TimeoutError):
                    raise StoreError(f"bucket {self.bucket}: {subject} stopped coming") from None
                for msg in msgs:
                    left -= 1
                    yield msg.data
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass

    async def delete(self, file_id: str) -> None:
        try:
            await self.store.delete(file_id)
        except nats.js.errors.NotFoundError:
            raise FileNotFound(f"No such file: {file_id}.") from None

    async def chunks(self, info: api.ObjectInfo) -> AsyncIterator[bytes]:
        """The object's bytes, a few chunks at a time (memory stays bounded whatever its size);
        StoreError if they do not match its digest."""
        if not info.chunks:
            return
        digest = hashlib.sha256()
        async for data in self._read(f"$O.{self.bucket}.C.{info.nuid}", api.DeliverPolicy.ALL, info.chunks):
            digest.update(data)
            yield data
        expected = (info.digest or "").split("=", 1)[-1]
        if base64.urlsafe_b64encode(digest.digest()).decode() != expected:
            raise StoreError(f"file {info.name}: its bytes do not match its digest")

    async def lines(self, info: api.ObjectInfo) -> AsyncIterator[tuple[int, bytes]]:
        """``(number from 1, line without its newline)`` for each line, empty ones too."""
        rest, number = b"", 0
        async for data in self.chunks(info):
            data = rest + data
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                number += 1
                yield number, data[start:end]
                start = end + 1
            rest = data[start:]
        if rest:
            yield number + 1, rest


def _name_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _record(info: api.ObjectInfo) -> schema.FileRecord:
    try:
        return schema.file_record_decoder.decode(info.description or "")
    except msgspec.DecodeError:
        raise FileNotFound(f"No such file: {info.name}.") from None


# --- batches -----------------------------------------------------------------------------------


class Batches:
    """The batches bucket. Changes are compare-and-set: the gateway (cancel) and the batch
    service (progress) may write one batch at once, and neither overwrites the other."""

    def __init__(self, kv: KeyValue):
        self.kv = kv

    @classmethod
    async def open(cls, nc: NATS, config: cfg.Config) -> Batches:
        js = nc.jetstream(timeout=API_TIMEOUT_S)
        bucket = batches_bucket(config)
        try:
            kv = await kvbucket.open_bucket(
                js, bucket, create=True, description="FIRST batches",
                replicas=config.nats.jetstream_replicas, ttl=config.batch.retention_days * DAY_S,
            )  # fmt: skip
        except (nats.js.errors.Error, nats.errors.Error) as exc:
            raise StoreError(f"KV bucket {bucket}: {_why(exc)}") from None
        return cls(kv)

    async def create(self, record: schema.BatchRecord) -> None:
        await self.kv.create(batch_key(record.owner, record.id), schema.encode(record))

    async def get(self, key: str) -> schema.BatchRecord | None:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        try:
            return schema.batch_record_decoder.decode(entry.value or b"")
        except msgspec.DecodeError:
            return None

    async def update(
        self, key: str, change: Callable[[schema.BatchRecord], schema.BatchRecord | None]
    ) -> schema.BatchRecord | None:
        """Apply ``change`` to the current record and store it, again on a concurrent write;
        ``change`` returns None to leave it as it is. The record as stored (None: no such batch)."""
        for _ in range(100):
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                return None
            record = schema.batch_record_decoder.decode(entry.value or b"")
            new = change(msgspec.structs.replace(record))
            if new is None:
                return record
            try:
                await self.kv.update(key, schema.encode(new), last=entry.revision)
                return new
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise StoreError(f"batch {key}: too many concurrent changes")

    async def keys(self, owner: str | None = None) -> list[str]:
        """Every batch's key, or one owner's."""
        watcher = await self.kv.watch(
            f"{owner_key(owner)}.*" if owner is not None else ">", ignore_deletes=True, meta_only=True
        )
        keys = []
        try:
            async for entry in watcher:
                if entry is None:  # the end of what is stored now
                    break
                keys.append(entry.key)
        finally:
            await watcher.stop()
        return keys

    async def of(self, owner: str | None = None) -> list[schema.BatchRecord]:
        """An owner's batches (None: everyone's), newest first."""
        found = [r for key in await self.keys(owner) if (r := await self.get(key)) is not None]
        return sorted(found, key=lambda r: (r.created_at, r.id), reverse=True)


def now() -> int:
    return int(time.time())


def parse_window(window: str) -> int | None:
    """Seconds in a completion window (``24h``, OpenAI's only one; ``<n>h`` generally), or None."""
    hours = window[:-1]  # ASCII digits only: int() refuses "²" and over 4300 digits
    if window.endswith("h") and hours.isascii() and hours.isdigit() and len(hours) <= 3:
        return int(hours) * 3600 if 1 <= int(hours) <= 24 * 30 else None
    return None


def subjects_of(config: cfg.Config) -> Subjects:
    return Subjects(config.nats.subject_prefix)
