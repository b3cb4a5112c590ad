"""The gateway's watch of the key bucket across a nats-server restart (same port and store): the
server forgets the watch's consumer, and the gateway must notice and watch again, not go on
with a copy that no longer changes."""

from __future__ import annotations

import time

import aiohttp
import nats
import pytest
from structlog.testing import capture_logs

from services.gateway.app import create_app, start_site
from shared import keystore
from tests.integration.conftest import make_config
from tests.support import eventually

pytestmark = pytest.mark.faults


async def _status(http: aiohttp.ClientSession, url: str, key: str) -> int | None:
    try:
        async with http.get(url + "/v1/whoami", headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status
    except aiohttp.ClientError:
        return None


async def test_after_a_nats_restart_new_keys_and_revocations_reach_the_gateway(restartable_nats, subjects):
    """A key made and a key revoked after the restart are taken and refused within a few seconds
    of NATS's return (its reconnect, one check, one load); keys known before keep working
    while NATS is away."""
    config = make_config([], nats={"subject_prefix": subjects.prefix}, auth={"methods": ["keys"]})
    bucket = keystore.bucket_name(config)
    admin = await nats.connect(restartable_nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    kv = await keystore.open_bucket(admin.jetstream(), bucket, create=True)
    kept, _, _ = await keystore.create(kv, "kept", [])
    doomed, doomed_id, _ = await keystore.create(kv, "doomed", [])
    runner = await start_site(create_app(config, restartable_nats.url), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            await eventually(lambda: _is(http, url, kept, 200), timeout=5, what="the first load")
            with capture_logs() as logs:
                await restartable_nats.stop()
                assert await _status(http, url, kept) == 200  # the copy in memory serves on
                await restartable_nats.start()
                back = time.monotonic()
                kv = await eventually(
                    lambda: _reopen(admin, bucket), timeout=10, what="the admin connection to return"
                )
                fresh, _, _ = await keystore.create(kv, "fresh", [])
                await keystore.revoke(kv, await keystore.fetch(kv, doomed_id))
                await eventually(lambda: _is(http, url, fresh, 200), timeout=8, what="the new key")
                await eventually(lambda: _is(http, url, doomed, 401), timeout=2, what="the revocation")
                assert time.monotonic() - back < 8
            assert any(e["event"] == "keys_reloading" for e in logs), [e["event"] for e in logs]
            assert await _status(http, url, kept) == 200
    finally:
        await runner.cleanup()
        await admin.close()


async def _is(http, url: str, key: str, status: int) -> bool:
    return await _status(http, url, key) == status


async def _reopen(admin, bucket: str):
    if not admin.is_connected:
        return None
    try:
        return await keystore.open_bucket(admin.jetstream(), bucket, create=False)
    except (nats.errors.Error, TimeoutError):
        return None
