"""API keys: their form, the record kept for each, and the JetStream KV bucket that holds them.

A key is ``first-<id>-<secret>``: the id (12 lowercase hex digits) is public and names the
bucket entry; the secret (43 characters from ``secrets.token_urlsafe(32)``, 256 bits) is shown
once by ``first keys create`` and kept only as its SHA-256 digest. A slow password hash adds
nothing to a secret with that much entropy, and a fast one keeps the gateway's check at a dict
lookup and a hash. ``first keys`` (services/admin/keys.py) writes the bucket; every gateway
(services/gateway/auth/keys.py) keeps a copy of it in memory, current through a KV watch.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from shared import config as cfg
from shared import kvbucket

PREFIX = "first-"
_KEY = re.compile(r"first-([0-9a-f]{12})-([A-Za-z0-9_-]{32,256})")
_ID = re.compile(r"[0-9a-f]{12}")
MAX_NAME = 256  # Identity.user and Identity.groups[i] hold at most this
MAX_GROUPS = 1024

_Group = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
State = Literal["active", "expired", "revoked"]


class KeyRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One key's bucket entry, under its id. Unknown fields pass (a newer ``first keys`` may add some)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]  # the identity's user
    secret_sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    groups: Annotated[list[_Group], msgspec.Meta(max_length=MAX_GROUPS)] = msgspec.field(default_factory=list)
    created: float  # unix seconds
    expires: float | None = None  # unix seconds; None: never
    revoked: bool = False
    revoked_at: float | None = None  # unix seconds

    def state(self, now: float) -> State:
        if self.revoked:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(KeyRecord)


def encode(record: KeyRecord) -> bytes:
    return _encoder.encode(record)


def decode(value: bytes) -> KeyRecord:
    """Raises msgspec.ValidationError or msgspec.DecodeError: the bucket is input like any other."""
    return _decoder.decode(value)


# --- the key itself -------------------------------------------------------------------------------


def new_key() -> tuple[str, str, str]:
    """A fresh ``(key, id, secret)``."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{PREFIX}{key_id}-{secret}", key_id, secret


def parse(key: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed key, else None."""
    m = _KEY.fullmatch(key)
    return None if m is None else (m.group(1), m.group(2))


def is_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


# --- what `first keys create` is given --------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``45s`` or ``2w``; ValueError otherwise."""
    m = _DURATION.fullmatch(text.strip().lower())
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)] if m else 0.0
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a duration: write one like 30d, 12h or 90m")
    return seconds


def check_name(name: str) -> str:
    """A key's name, as its identity's user: printable, not blank, at most 256 characters."""
    if not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise ValueError(f"a key's name must be 1 to {MAX_NAME} printable characters, not all blank")
    return name


def parse_groups(text: str) -> list[str]:
    """``"a, b,,a"`` -> ``["a", "b"]``: comma-separated, trimmed, each once, in the order given."""
    groups = list(dict.fromkeys(g.strip() for g in text.split(",") if g.strip()))
    if len(groups) > MAX_GROUPS or any(len(g) > MAX_NAME or not g.isprintable() for g in groups):
        raise ValueError(f"at most {MAX_GROUPS} groups, each of 1 to {MAX_NAME} printable characters")
    return groups


def iso(ts: float | None) -> str | None:
    """Unix seconds as ``2025-01-31T12:00:00Z``."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the bucket -------------------------------------------------------------------------------------


def bucket_name(config: cfg.Config) -> str:
    """``auth.keys.bucket``, or ``<subject prefix>_keys`` with the prefix's dots as ``_``."""
    return config.auth.keys.bucket or config.nats.subject_prefix.replace(".", "_") + "_keys"


async def open_bucket(
    js: JetStreamContext, bucket: str, *, create: bool, replicas: int = 0
) -> KeyValue | None:
    """The key bucket; if missing, created (``create``) or None."""
    description = "FIRST API keys (first keys): SHA-256 digests of their secrets, never the secrets"
    return await kvbucket.open_bucket(js, bucket, create=create, description=description, replicas=replicas)


@dataclass(frozen=True, slots=True)
class Stored:
    """An entry as read: its record (None: not decodable) and the revision an update must name."""

    key_id: str
    record: KeyRecord | None
    revision: int


def read_entry(entry: KeyValue.Entry) -> Stored | None:
    """A watched or fetched entry; None for a deleted one or a key that is not an id."""
    if entry.operation in (KV_DEL, KV_PURGE) or not is_id(entry.key):
        return None
    try:
        record = decode(entry.value or b"")
    except (msgspec.ValidationError, msgspec.DecodeError):
        record = None
    return Stored(entry.key, record, entry.revision)


async def fetch(kv: KeyValue, key_id: str) -> Stored | None:
    """One entry by its id; None if there is none."""
    try:
        return read_entry(await kv.get(key_id))
    except nats.js.errors.KeyNotFoundError:  # deleted ones too
        return None


async def read_all(kv: KeyValue, *, timeout_s: float = 10.0) -> list[Stored]:
    """Every entry, in one pass of a watch (one consumer, not a request per key)."""
    entries, _ = await kvbucket.snapshot(kv, timeout_s=timeout_s)
    return [stored for entry in entries.values() if (stored := read_entry(entry)) is not None]


async def create(
    kv: KeyValue, name: str, groups: list[str], lifetime_s: float | None = None
) -> tuple[str, str, KeyRecord]:
    """A new key in the bucket: ``(key, id, record)``. The key exists nowhere else."""
    now = time.time()
    for _ in range(5):  # ids are 48 random bits: a clash is all but impossible, and then refused
        key, key_id, secret = new_key()
        record = KeyRecord(
            name=check_name(name),
            secret_sha256=digest(secret).hex(),
            groups=groups,
            created=now,
            expires=None if lifetime_s is None else now + lifetime_s,
        )
        try:
            await kv.create(key_id, encode(record))
        except nats.js.errors.KeyWrongLastSequenceError:
            continue
        return key, key_id, record
    raise RuntimeError("could not find a free key id")


async def revoke(kv: KeyValue, stored: Stored) -> KeyRecord:
    """Mark the entry revoked (kept, so ``first keys list`` still shows it). Fails with
    KeyWrongLastSequenceError if it changed since it was read."""
    if stored.record is None:
        raise ValueError(f"the entry of key {stored.key_id} cannot be read")
    record = msgspec.structs.replace(stored.record, revoked=True, revoked_at=time.time())
    await kv.update(stored.key_id, encode(record), last=stored.revision)
    return record
