"""``first keys create|list|revoke``: API keys in the JetStream KV bucket (shared/keystore.py).

Every failure is one line on stderr and exit status 2.
A key is printed once, by ``create``; ``list`` never shows a secret or its digest.
"""

from __future__ import annotations

import argparse
import sys
import time

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from services.admin import target
from services.admin.target import CommandError
from shared import config as cfg
from shared import keystore
from shared.connect import ConnectFailed

_TIMEOUT_S = 5.0


async def main(config: cfg.Config, args: argparse.Namespace) -> int:
    return await target.one_line("first keys", _run(config, args))


async def _run(config: cfg.Config, args: argparse.Namespace) -> int:
    try:
        nc, url = await target.connect(config, args, "first-keys")
    except ConnectFailed as exc:
        raise CommandError(str(exc)) from None
    try:
        return await _ACTIONS[args.action](nc.jetstream(timeout=_TIMEOUT_S), config, args)
    except nats.js.errors.ServiceUnavailableError:
        raise CommandError(
            f"the NATS server at {url} has JetStream off: keys need it (nats-server -js)"
        ) from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise CommandError(f"NATS at {url} failed: {_reason(exc)}") from None
    finally:
        await nc.close()


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


async def _bucket(js, bucket: str, *, create: bool, replicas: int = 0) -> KeyValue | None:
    try:
        return await keystore.open_bucket(js, bucket, create=create, replicas=replicas)
    except nats.js.errors.APIError as exc:
        if isinstance(exc, nats.js.errors.ServiceUnavailableError):
            raise
        raise CommandError(f"cannot open the key bucket {bucket!r}: {exc.description or exc}") from None


async def create(js, config: cfg.Config, args: argparse.Namespace) -> int:
    bucket = keystore.bucket_name(config)
    try:
        name = keystore.check_name(args.name)
        groups = keystore.parse_groups(args.groups)
        lifetime_s = keystore.parse_duration(args.expires) if args.expires else None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    kv = await _bucket(js, bucket, create=True, replicas=config.auth.keys.replicas)
    key, key_id, record = await keystore.create(kv, name, groups, lifetime_s)
    print(key, flush=True)
    expires = f", expires {keystore.iso(record.expires)}" if record.expires is not None else ""
    print(
        f"Key {key_id} for {name!r} (groups: {', '.join(groups) or 'none'}{expires}). This is the only"
        " time the key is shown: store it now. Only its SHA-256 digest is kept.",
        file=sys.stderr,
    )
    return 0


async def list_(js, config: cfg.Config, args: argparse.Namespace) -> int:
    bucket = keystore.bucket_name(config)
    kv = await _bucket(js, bucket, create=False)
    found = [] if kv is None else await keystore.read_all(kv, timeout_s=_TIMEOUT_S)
    now = time.time()
    rows = []
    for stored in found:
        r = stored.record
        if r is None:
            print(f"first keys: the entry of key {stored.key_id} cannot be read", file=sys.stderr)
            continue
        rows.append(
            {
                "id": stored.key_id,
                "name": r.name,
                "groups": r.groups,
                "created": keystore.iso(r.created),
                "expires": keystore.iso(r.expires),
                "state": r.state(now),
            }
        )
    rows.sort(key=lambda row: (row["created"], row["id"]))
    if args.json:
        for row in rows:
            sys.stdout.buffer.write(msgspec.json.encode(row) + b"\n")
        return 0
    table = [["ID", "NAME", "GROUPS", "CREATED", "EXPIRES", "STATE"]]
    table += [
        [
            row["id"],
            row["name"],
            ",".join(row["groups"]) or "-",
            row["created"],
            row["expires"] or "never",
            row["state"],
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


async def revoke(js, config: cfg.Config, args: argparse.Namespace) -> int:
    bucket = keystore.bucket_name(config)
    wanted = args.key
    if (parsed := keystore.parse(wanted)) is not None:  # a whole key names its id
        wanted = parsed[0]
    kv = await _bucket(js, bucket, create=False)
    if kv is None:
        raise CommandError(f"no key has the id or the name {wanted!r}: no key was ever made here")
    for _ in range(3):  # the entry changed between our read and our write: read it again
        target = await _choose(kv, wanted)
        if target.record.revoked:
            print(f"Key {target.key_id} ({target.record.name}) was revoked already.")
            return 0
        try:
            await keystore.revoke(kv, target)
        except nats.js.errors.KeyWrongLastSequenceError:
            continue
        print(f"Revoked key {target.key_id} ({target.record.name}): every gateway refuses it from now on.")
        return 0
    raise CommandError(f"key {wanted!r} kept changing while it was being revoked: try again")


async def _choose(kv: KeyValue, wanted: str) -> keystore.Stored:
    """The key with this id; else the one key of this name that is not revoked yet."""
    if keystore.is_id(wanted) and (stored := await keystore.fetch(kv, wanted)) is not None:
        if stored.record is None:
            raise CommandError(f"the entry of key {wanted} cannot be read")
        return stored
    found = await keystore.read_all(kv, timeout_s=_TIMEOUT_S)
    named = [s for s in found if s.record is not None and s.record.name == wanted]
    if not named:
        raise CommandError(f"no key has the id or the name {wanted!r} (see 'first keys list')")
    live = [s for s in named if not s.record.revoked] or named[:1]  # all revoked: say so
    if len(live) > 1:
        ids = ", ".join(s.key_id for s in live)
        raise CommandError(f"{len(live)} keys are named {wanted!r} ({ids}): revoke one by its id")
    return live[0]


_ACTIONS = {"create": create, "list": list_, "revoke": revoke}
