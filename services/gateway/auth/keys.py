"""API keys (``first keys create``) at the gateway.

The gateway holds a copy of the key bucket in memory, kept current by a KV watch, so checking a
key costs a dict lookup and a SHA-256, never a NATS round trip; a key created or revoked anywhere
reaches every gateway as fast as NATS delivers the entry. The watch is checked every second
against the bucket's last sequence and the connection's reconnect count: a consumer lost with a
restarted server, or a bucket recreated, makes it load the bucket afresh. Until the first load,
requests wait briefly, then get 503 (never 401: the key may be good); after it, a broken watch
keeps the last copy, which is all NATS could have told us anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from dataclasses import dataclass

import nats.errors
import structlog
from nats.js.kv import KeyValue

from shared import errors, keystore, schema
from shared.children import cancel_and_wait
from shared.supervise import Throttle

PREFIX = keystore.PREFIX
LOAD_WAIT_S = 2.0  # a request that comes before the first load waits this long, then gets 503
CHECK_S = 1.0  # how often the watch is compared with the bucket (one small request)
_VERIFIED_MAX = 10_000  # keys remembered as verified; all are forgotten when it is full
_ENTRY_TIMEOUT_S = 10.0  # the first load gives up on a bucket that stops delivering
_RETRY_MIN_S, _RETRY_MAX_S = 0.1, 5.0

MALFORMED = (
    "This API key is malformed: keys of this service look like first-<12 hex digits>-<secret>."
    " Send the whole key, as 'first keys create' printed it."
)
UNKNOWN = "This API key is not known here: ask the service's administrators for one ('first keys create')."
WRONG_SECRET = (
    "This API key does not match the key of its id: send the whole key, as 'first keys create' printed it."
)


@dataclass(frozen=True, slots=True)
class _Key:
    digest: bytes
    identity: schema.Identity  # one object for every request with this key: nothing changes it
    expires: float | None
    revoked: bool


class _Stale(Exception):
    """The watch may have missed entries: load the bucket afresh."""


class _NoBucket(Exception):
    """No key has been made yet: the bucket is created by the first ``first keys create`` (the
    gateway reads keys, it does not make streams), and looked for again every CHECK_S."""


class KeyAuthenticator:
    name = "keys"

    def __init__(self, nc, config) -> None:
        self.nc = nc
        self.bucket = keystore.bucket_name(config)
        self._keys: dict[str, _Key] | None = None  # None until the first load
        self._loaded = asyncio.Event()
        self._revision = 0  # the last bucket entry seen
        self._failures = 0
        self._task: asyncio.Task | None = None
        self._unreadable = Throttle()
        # Keys whose secret matched, with the entry they matched: the same key again skips the
        # parse and the hash (~2 µs) while its entry stays the same object (a change replaces it).
        self._verified: dict[str, tuple[str, _Key]] = {}

    def claims(self, credential: str) -> bool:
        return credential.startswith(PREFIX)

    def known(self, credential: str) -> schema.Identity | None:
        # Keys are checked here, not by asking anyone: a valid one is known good.
        if self._keys is None:
            return None
        try:
            return self._check(self._keys, credential)
        except errors.Unauthorized:
            return None

    async def identify(self, credential: str) -> schema.Identity:
        keys = self._keys if self._keys is not None else await self._wait_loaded()
        return self._check(keys, credential)

    def _check(self, keys: dict[str, _Key], credential: str) -> schema.Identity:
        verified = self._verified.get(credential)
        if verified is not None and keys.get(verified[0]) is verified[1]:
            known, key_id = verified[1], verified[0]  # its entry has not changed since
        else:
            parsed = keystore.parse(credential)
            if parsed is None:
                raise errors.Unauthorized(MALFORMED)
            key_id, secret = parsed
            known = keys.get(key_id)
            if known is None:
                raise errors.Unauthorized(UNKNOWN)
            # Its state is told only to whoever holds the secret.
            if not hmac.compare_digest(keystore.digest(secret), known.digest):
                raise errors.Unauthorized(WRONG_SECRET)
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.clear()
            self._verified[credential] = (key_id, known)
        if known.revoked:
            raise errors.Unauthorized(
                f"This API key ({key_id}) was revoked: ask the service's administrators for a new one."
            )
        if known.expires is not None and time.time() >= known.expires:
            raise errors.Unauthorized(
                f"This API key ({key_id}) expired at {keystore.iso(known.expires)}:"
                " ask the service's administrators for a new one."
            )
        return known.identity

    async def _wait_loaded(self) -> dict[str, _Key]:
        try:
            async with asyncio.timeout(LOAD_WAIT_S):
                await self._loaded.wait()
        except TimeoutError:
            raise errors.NoCapacity(
                "The API keys are not loaded yet (NATS is unreachable or slow): try again shortly.",
                retry_after_s=5,
            ) from None
        return self._keys

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch_forever(), name="keys-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    # --- the watch ---------------------------------------------------------------------------------

    async def _watch_forever(self) -> None:
        """Load and follow the bucket for as long as the gateway runs: a failure is logged and
        retried (sooner while the gateway has no keys at all), never the end of the watch."""
        log = structlog.get_logger().bind(bucket=self.bucket)
        while True:
            try:
                await self._follow()
            except _Stale as exc:
                log.info("keys_reloading", reason=str(exc))
            except _NoBucket:
                await asyncio.sleep(CHECK_S)
            except Exception as exc:  # NATS down, JetStream off, no permission: all retried
                delay = min(_RETRY_MAX_S, _RETRY_MIN_S * 2**self._failures)
                self._failures += 1
                log.warning(
                    "keys_watch_failed", error=repr(exc), retry_in_s=delay, loaded=self._loaded.is_set()
                )
                await asyncio.sleep(delay)

    async def _follow(self) -> None:
        """Load the whole bucket, swap it in, then apply each change as it comes."""
        kv = await keystore.open_bucket(self.nc.jetstream(), self.bucket, create=False)
        if kv is None:
            if self._keys is None or self._keys:  # at start, or the bucket was deleted
                structlog.get_logger().info("keys_bucket_missing", bucket=self.bucket)
            self._keys, self._revision, self._failures = {}, 0, 0
            self._loaded.set()
            raise _NoBucket
        reconnects = self.nc.stats["reconnects"]
        watcher = await kv.watchall()
        try:
            fresh: dict[str, _Key] = {}
            revision = 0
            while (entry := await watcher.updates(timeout=_ENTRY_TIMEOUT_S)) is not None:
                revision = max(revision, entry.revision)
                self._apply(fresh, entry)
            self._keys, self._revision, self._failures = fresh, revision, 0
            self._loaded.set()
            structlog.get_logger().info("keys_loaded", bucket=self.bucket, keys=len(fresh), revision=revision)
            await self._apply_changes(kv, watcher, reconnects)
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone with the consumer
                await watcher.stop()

    async def _apply_changes(self, kv: KeyValue, watcher: KeyValue.KeyWatcher, reconnects: int) -> None:
        behind = 0  # the bucket's last sequence at the previous check
        next_check = time.monotonic() + CHECK_S
        while True:
            try:
                entry = await watcher.updates(timeout=max(0.01, next_check - time.monotonic()))
            except nats.errors.TimeoutError:
                entry = None
            if isinstance(entry, KeyValue.Entry):
                self._revision = max(self._revision, entry.revision)
                self._apply(self._keys, entry)
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + CHECK_S
            if self.nc.stats["reconnects"] != reconnects:
                raise _Stale("reconnected to NATS: the server may have lost the watch's consumer")
            last = (await kv.status()).stream_info.state.last_seq
            if last < self._revision:
                raise _Stale("the bucket is younger than what was read from it: it was recreated")
            # An entry the bucket held a whole check ago has still not arrived: the watch is dead.
            if behind > self._revision:
                raise _Stale(f"the watch is at entry {self._revision}, the bucket was at {behind}")
            behind = last

    def _apply(self, keys: dict[str, _Key], entry: KeyValue.Entry) -> None:
        stored = keystore.read_entry(entry)
        if stored is None or stored.record is None:  # deleted, or nothing a key can match
            keys.pop(entry.key, None)
            if stored is not None and self._unreadable(entry.key):
                structlog.get_logger().warning("keys_entry_unreadable", bucket=self.bucket, key_id=entry.key)
            return
        record = stored.record
        keys[stored.key_id] = _Key(
            digest=bytes.fromhex(record.secret_sha256),
            identity=schema.Identity(
                user=record.name, kind="key", groups=record.groups, key_id=stored.key_id
            ),
            expires=record.expires,
            revoked=record.revoked,
        )
