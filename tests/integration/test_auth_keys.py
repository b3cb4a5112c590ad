"""API keys at the gateway: gateways in this process with ``auth.methods = ["keys"]``, real HTTP in
front, the key bucket on the session's nats-server written through shared/keystore.py (as
``first keys`` writes it), and a router and a worker where an answer is needed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import msgspec
import nats
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from services.gateway import keys as app_keys
from services.gateway.app import create_app
from services.gateway.auth import keys as key_auth
from shared import config as cfg
from shared import keystore
from shared.natsserver import find_binary
from tests.integration.conftest import make_config
from tests.support import eventually, free_port

MODELS = [{"id": "m"}, {"id": "physics", "allowed_groups": ["physics"]}]


@dataclass
class Gateway:
    app: web.Application
    config: cfg.Config
    url: str

    @property
    def authenticator(self) -> key_auth.KeyAuthenticator:
        return self.app[app_keys.AUTHENTICATORS][0]


def keys_config(prefix: str) -> cfg.Config:
    # Limits off: the tests poll, and a poll is not a burst to refuse.
    return make_config(
        [dict(m) for m in MODELS],
        nats={"subject_prefix": prefix},
        auth={"methods": ["keys"]},
        limits={"user": {"requests_per_s": 0, "model_tokens_per_min": 0}},
    )


@pytest.fixture
async def gateway(services, subjects):
    """``await gateway()``: one more gateway on the test's prefix (and so the test's key bucket)."""

    async def start(url: str = services.nats_url) -> Gateway:
        config = keys_config(subjects.prefix)
        app = create_app(config, url)
        return Gateway(app, config, await services.gateway(app))

    return start


@pytest.fixture
async def kv(nc, subjects):
    """The test's key bucket, as ``first keys create`` makes it."""
    return await keystore.open_bucket(
        nc.jetstream(), keystore.bucket_name(keys_config(subjects.prefix)), create=True
    )


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def whoami(http, gw: Gateway, key: str | None, path: str = "/v1/whoami") -> tuple[int, dict]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with http.get(gw.url + path, headers=headers) as r:
        return r.status, await r.json()


async def chat(http, gw: Gateway, model: str, key: str) -> tuple[int, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with http.post(
        gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        return r.status, await r.json()


async def accepted(http, gw: Gateway, key: str) -> bool:
    return (await whoami(http, gw, key))[0] == 200


async def refused(http, gw: Gateway, key: str) -> bool:
    return (await whoami(http, gw, key))[0] == 401


async def expired_key(kv, name: str = "old") -> str:
    """A key whose lifetime ended a minute ago (``first keys create`` only makes future expiries)."""
    key, key_id, secret = keystore.new_key()
    record = keystore.KeyRecord(
        name=name,
        secret_sha256=keystore.digest(secret).hex(),
        created=time.time() - 120,
        expires=time.time() - 60,
    )
    await kv.create(key_id, keystore.encode(record))
    return key


async def revoked_key(kv, name: str = "gone") -> str:
    key, key_id, _ = await keystore.create(kv, name, [])
    await keystore.revoke(kv, await keystore.fetch(kv, key_id))
    return key


# --- a valid key -----------------------------------------------------------------------------------


async def test_a_valid_key_is_served_and_whoami_names_its_identity(gateway, kv, http, services):
    """A key made in the bucket gets an answer from the model, and /v1/whoami (and FIRST's
    /resource_server/whoami) say who it is: its name, kind "key", its groups and its id."""
    gw = await gateway()
    await services.router(gw.config)
    await services.worker(gw.config, "m")
    key, key_id, _ = await keystore.create(kv, "alice", ["physics", "chem"])

    await eventually(lambda: accepted(http, gw, key), timeout=5, what="the gateway to know the key")
    status, body = await chat(http, gw, "m", key)
    assert status == 200 and body["choices"][0]["message"]["content"]
    status, me = await whoami(http, gw, key)
    assert status == 200
    assert {k: me[k] for k in ("user", "kind", "groups", "key_id")} == {
        "user": "alice",
        "kind": "key",
        "groups": ["physics", "chem"],
        "key_id": key_id,
    }
    status, first = await whoami(http, gw, key, "/resource_server/whoami")
    assert (status, first["id"], first["auth_service"], first["user_group_uuids"]) == (
        200,
        "alice",
        "key",
        ["physics", "chem"],
    )


# --- every refusal ---------------------------------------------------------------------------------


async def test_every_bad_credential_gets_401_that_never_echoes_the_key(gateway, kv, http):
    """Missing, malformed, unknown, wrong secret, revoked, expired, and a good key in the query
    string: each is 401 ``unauthorized`` with a message that says what to do, and none of them
    repeats the secret it was sent."""
    gw = await gateway()
    good, good_id, _ = await keystore.create(kv, "alice", [])
    good_secret = keystore.parse(good)[1]
    unknown, _, _ = keystore.new_key()
    revoked = await revoked_key(kv)
    expired = await expired_key(kv)
    other_secret = keystore.new_key()[2]
    await eventually(lambda: accepted(http, gw, good), timeout=5, what="the gateway to load the bucket")
    await eventually(lambda: refused(http, gw, revoked), timeout=5, what="the revoked key to be loaded")

    cases = {
        "missing": (None, "Missing ('Authorization'"),
        "malformed": ("first-0123-short", "malformed"),
        "unknown id": (unknown, "not known here"),
        "wrong secret": (f"first-{good_id}-{other_secret}", "does not match"),
        "revoked": (revoked, "was revoked"),
        "expired": (expired, "expired at"),
    }
    for case, (key, says) in cases.items():
        status, body = await whoami(http, gw, key)
        error = body["error"]
        assert (status, error["code"], error["type"]) == (401, "unauthorized", "authentication_error"), case
        assert says in error["message"], (case, error["message"])
        if key is not None:
            secret = parsed[1] if (parsed := keystore.parse(key)) else key
            assert secret not in error["message"], case
    async with http.get(gw.url + f"/v1/whoami?api_key={good}") as r:
        body = await r.json()
        assert r.status == 401 and "in the URL are refused" in body["error"]["message"]
        assert good_secret not in body["error"]["message"]


async def test_an_expired_key_stops_working_at_its_expiry_without_any_change_in_the_bucket(gateway, kv, http):
    """Expiry is checked at each request, not when the entry arrives."""
    gw = await gateway()
    key, _, _ = await keystore.create(kv, "brief", [], lifetime_s=1.0)
    await eventually(lambda: accepted(http, gw, key), timeout=1, what="the key to work before its expiry")
    _, body = await eventually(
        lambda: _refusal(http, gw, key), timeout=3, what="the key to be refused after its expiry"
    )
    assert "expired at" in body["error"]["message"]


async def _refusal(http, gw, key):
    status, body = await whoami(http, gw, key)
    return (status, body) if status == 401 else None


# --- groups ----------------------------------------------------------------------------------------


async def test_a_model_open_to_a_group_is_listed_and_served_only_for_keys_in_that_group(
    gateway, kv, http, services
):
    gw = await gateway()
    await services.router(gw.config)
    await services.worker(gw.config, "physics")
    member, _, _ = await keystore.create(kv, "marie", ["physics"])
    outsider, _, _ = await keystore.create(kv, "bob", ["chem"])
    await eventually(lambda: accepted(http, gw, outsider), timeout=5, what="the keys to load")

    async def listed(key: str) -> set[str]:
        async with http.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
            return {m["id"] for m in (await r.json())["data"]}

    assert await listed(member) == {"m", "physics"}
    assert await listed(outsider) == {"m"}
    status, body = await chat(http, gw, "physics", member)
    assert status == 200, body
    status, body = await chat(http, gw, "physics", outsider)
    assert (status, body["error"]["code"]) == (403, "permission_denied")


# --- the watch -------------------------------------------------------------------------------------


async def test_a_revoked_key_is_refused_by_a_running_gateway_within_a_second(gateway, kv, http):
    gw = await gateway()
    key, key_id, _ = await keystore.create(kv, "alice", [])
    await eventually(lambda: accepted(http, gw, key), timeout=5, what="the key to load")
    await keystore.revoke(kv, await keystore.fetch(kv, key_id))
    began = time.monotonic()
    await eventually(
        lambda: refused(http, gw, key), timeout=1, interval=0.01, what="the revocation to arrive"
    )
    assert time.monotonic() - began < 1


async def test_a_key_made_while_two_gateways_run_is_taken_by_both_within_a_second(gateway, kv, http):
    first, second = await gateway(), await gateway()
    ready, _, _ = await keystore.create(kv, "warmup", [])
    for gw in (first, second):
        await eventually(lambda gw=gw: accepted(http, gw, ready), timeout=5, what="the bucket to load")
    key, _, _ = await keystore.create(kv, "carol", [])
    began = time.monotonic()
    for gw in (first, second):
        await eventually(lambda gw=gw: accepted(http, gw, key), timeout=1, interval=0.01, what="the new key")
    assert time.monotonic() - began < 1


async def test_without_a_bucket_keys_are_unknown_until_the_first_one_is_made(gateway, nc, subjects, http):
    """The gateway does not create the bucket (its NATS user may not): with none, every key is
    unknown (401, not 503), and the first key made is taken within a couple of seconds."""
    gw = await gateway()
    stray, _, _ = keystore.new_key()
    status, body = await whoami(http, gw, stray)
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    kv = await keystore.open_bucket(nc.jetstream(), keystore.bucket_name(gw.config), create=True)
    key, _, _ = await keystore.create(kv, "first-user", [])
    await eventually(lambda: accepted(http, gw, key), timeout=3, interval=0.05, what="the new bucket's key")


async def test_garbage_in_the_bucket_is_logged_and_skipped_and_the_watch_goes_on(gateway, kv, http):
    """An entry that is not a key record, and a key that is not an id, are left out (the id is
    unknown, and logged); keys written after them still arrive."""
    gw = await gateway()
    await eventually(lambda: gw.authenticator._loaded.is_set(), timeout=5, what="the first load")
    bad_key, bad_id, _ = keystore.new_key()
    with capture_logs() as logs:
        await kv.put(bad_id, b"\xff not json")
        await kv.put("not-an-id", b"{}")
        key, _, _ = await keystore.create(kv, "after", [])
        await eventually(lambda: accepted(http, gw, key), timeout=2, what="the key after the garbage")
    status, body = await whoami(http, gw, bad_key)
    assert status == 401 and "not known" in body["error"]["message"]
    assert any(e["event"] == "keys_entry_unreadable" and e["key_id"] == bad_id for e in logs)


async def test_a_watch_whose_consumer_is_deleted_is_established_again(gateway, kv, nc, http):
    """The server loses the watch's consumer (as a restarted server does): the gateway notices
    within two checks, loads the bucket afresh, and a key made after the loss still works."""
    gw = await gateway()
    await eventually(lambda: gw.authenticator._loaded.is_set(), timeout=5, what="the first load")
    jsm = nc.jetstream()
    stream = f"KV_{keystore.bucket_name(gw.config)}"
    consumers = await eventually(lambda: jsm.consumers_info(stream), timeout=2, what="the watch's consumer")
    with capture_logs() as logs:
        for c in consumers:
            await jsm.delete_consumer(stream, c.name)
        key, _, _ = await keystore.create(kv, "late", [])
        await eventually(lambda: accepted(http, gw, key), timeout=2 * key_auth.CHECK_S + 2, what="the key")
    assert any(e["event"] == "keys_reloading" for e in logs), logs


async def test_a_bucket_deleted_and_made_again_is_followed(gateway, kv, nc, http):
    """Keys of a deleted bucket stop working; the new bucket's keys work (its entry numbers start
    over, below what the gateway had read)."""
    gw = await gateway()
    old, _, _ = await keystore.create(kv, "old", [])
    await keystore.create(kv, "old2", [])
    await eventually(lambda: accepted(http, gw, old), timeout=5, what="the first load")
    bucket = keystore.bucket_name(gw.config)
    await nc.jetstream().delete_key_value(bucket)
    await eventually(
        lambda: refused(http, gw, old), timeout=3 * key_auth.CHECK_S + 2, what="the old key gone"
    )
    new_kv = await keystore.open_bucket(nc.jetstream(), bucket, create=True)
    key, _, _ = await keystore.create(new_kv, "new", [])
    await eventually(lambda: accepted(http, gw, key), timeout=3 * key_auth.CHECK_S + 2, what="the new key")


async def test_before_the_first_load_a_request_waits_then_gets_503_not_401(gateway, http):
    """A gateway whose NATS has no JetStream cannot load the keys: a key is answered 503 with
    Retry-After after a short wait (it may well be good), and the failure is logged, again and
    again, never silently given up."""
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        find_binary(), "-a", "127.0.0.1", "-p", str(port), stderr=asyncio.subprocess.PIPE
    )  # no -js
    try:
        while b"Server is ready" not in await asyncio.wait_for(server.stderr.readline(), 10):
            pass
        with capture_logs() as logs:
            gw = await gateway(f"nats://127.0.0.1:{port}")
            key, _, _ = keystore.new_key()
            began = time.monotonic()
            async with http.get(gw.url + "/v1/whoami", headers={"Authorization": f"Bearer {key}"}) as r:
                body = await r.json()
                assert (r.status, body["error"]["code"]) == (503, "no_capacity")
                assert r.headers["Retry-After"] == "5"
            assert key_auth.LOAD_WAIT_S <= time.monotonic() - began < key_auth.LOAD_WAIT_S + 1
            failures = [e for e in logs if e["event"] == "keys_watch_failed"]
            assert len(failures) >= 2 and not failures[-1]["loaded"]
    finally:
        server.terminate()
        await server.wait()


async def test_a_key_is_checked_from_memory_without_nats(nc, subjects):
    """identify() answers with no NATS connection at all once the bucket is loaded: the request
    path never waits on a round trip."""
    config = keys_config(subjects.prefix)
    kv = await keystore.open_bucket(nc.jetstream(), keystore.bucket_name(config), create=True)
    key, key_id, _ = await keystore.create(kv, "dave", ["g"])
    conn = await nats.connect(nc.connected_url.geturl())
    auth = key_auth.KeyAuthenticator(conn, config)
    await auth.start()
    try:
        await eventually(lambda: auth._loaded.is_set(), timeout=5, what="the first load")
        await conn.close()
        identity = await auth.identify(key)
        assert (identity.user, identity.kind, identity.groups, identity.key_id) == (
            "dave",
            "key",
            ["g"],
            key_id,
        )
        assert msgspec.json.encode(identity)  # it travels on the wire as it is
    finally:
        await auth.stop()
