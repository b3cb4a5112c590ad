"""NATS-native callers (``nats.clients``, submitting on ``infer.user.<name>``) are held to ``[limits]``
as HTTP callers are: real nats-server, real routers, sim workers, ``FirstClient(user=...)`` as the
caller. The last test runs on a server with the permissions ``first up`` writes (shared/natsauth.py),
so a subject the router role lacks fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import nats
import orjson
import pytest

from services.gateway.app import create_app
from services.router.service import Router
from services.worker.engines import make_engine
from services.worker.service import Worker
from shared import errors, events, natsauth, schema
from shared.client import FirstClient
from shared.connect import close, credential_options
from shared.natsserver import EmbeddedNats
from shared.subjects import Subjects
from tests.integration.conftest import make_config, table_auth
from tests.support import eventually

NO_LIMITS = {"requests_per_s": 0, "model_requests_per_s": 0, "tokens_per_min": 0, "model_tokens_per_min": 0}
LONG = orjson.dumps({"messages": [{"role": "user", "content": " ".join(["word"] * 32)}], "max_tokens": 4})
SHORT = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
MODEL_FULL = "the model 'm' serves 30 tokens/min to all users together"


def native_config(prefix: str, user_limits: dict, *, model_tpm: int = 0):
    return make_config(
        [{"id": "m", "tokens_per_min": model_tpm, "engine": {"kind": "sim", "ttft_ms": 0, "itl_ms": 0}}],
        nats={"subject_prefix": prefix, "clients": [{"name": "nat"}]},
        auth={"methods": ["keys"]},
        limits={"user": {**NO_LIMITS, **user_limits}},
    )


def spent(result) -> int:
    return result.usage.prompt_tokens + result.usage.completion_tokens


async def test_a_native_caller_over_requests_per_s_is_refused_at_once_with_a_retry_time(
    services, nc, subjects
):
    config = native_config(subjects.prefix, {"requests_per_s": 2})
    router = await services.router(config)
    await services.worker(config, "m")
    hits: list[schema.Event] = []

    async def on_hit(msg):
        hits.append(events.decode(msg.data))

    await nc.subscribe(subjects.events_of("limit"), cb=on_hit)
    nat = await services.client(user="nat", request_timeout_s=10)
    began = time.monotonic()
    answers = await asyncio.wait_for(
        asyncio.gather(*(nat.complete("m", "chat", SHORT) for _ in range(5)), return_exceptions=True), 5
    )  # within the same second
    took = time.monotonic() - began
    refused = [a for a in answers if isinstance(a, BaseException)]
    assert len(refused) == 3 and all(isinstance(a, errors.RateLimited) for a in refused), answers
    assert took < 2  # refused promptly, not after a time-out
    first = refused[0]
    assert "at most 2 requests/s per user" in first.message and first.status == 429
    assert 0 < first.retry_after_s <= 1.1
    await eventually(lambda: hits, what="the limit.hit event")
    (hit,) = hits  # one a minute per user and model, however many were refused
    assert (hit.kind, hit.name, hit.user, hit.model, hit.source) == (
        "limit",
        "hit",
        "nat",
        "m",
        router.router_id,
    )


async def test_a_native_callers_tokens_count_against_the_models_tokens_per_min_at_the_gateway(
    services, subjects
):
    """The table authenticator stands in for the gateway's (keys, Globus): it lets /v1/whoami show
    what the gateway counted for the user "nat", which only the router saw."""
    config = native_config(subjects.prefix, {}, model_tpm=30)
    await services.router(config)
    await services.worker(config, "m")
    app = create_app(config, services.nats_url)
    table_auth(
        app,
        {"alice": schema.Identity(user="alice", kind="key"), "nat": schema.Identity(user="nat", kind="nats")},
    )
    url = await services.gateway(app)
    nat = await services.client(user="nat", request_timeout_s=10)
    used = spent(await nat.complete("m", "chat", LONG))
    assert used >= 30
    async with aiohttp.ClientSession() as http:

        async def nats_tokens_at_gateway() -> int:
            async with http.get(url + "/v1/whoami", headers={"Authorization": "Bearer nat"}) as r:
                return (await r.json())["usage"]["models"].get("m", {}).get("tokens_per_min", 0)

        await eventually(nats_tokens_at_gateway, what="the gateway to hear of nat's tokens")
        assert await nats_tokens_at_gateway() == used
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with http.post(
            url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer alice"}
        ) as r:
            assert r.status == 429 and MODEL_FULL in (await r.json())["error"]["message"]
            assert r.headers["x-ratelimit-remaining-tokens"] == "0" and int(r.headers["Retry-After"]) >= 59
    with pytest.raises(errors.RateLimited, match=MODEL_FULL):  # and the caller itself, at the router
        await nat.complete("m", "chat", SHORT)


# --- with NATS permissions on ---------------------------------------------------------------------


@pytest.fixture
async def secured(tmp_path):
    config = native_config("lim", {}, model_tpm=30)
    credentials = natsauth.write_credentials(tmp_path / "credentials", natsauth.roles(config))
    conf = tmp_path / "server.conf"
    conf.write_bytes(natsauth.server_config(credentials, host="127.0.0.1", port=-1, store_dir=str(tmp_path)))
    async with EmbeddedNats(config_file=str(conf), users=credentials.public_keys()) as srv:
        yield srv.url, credentials, config


async def test_with_permissions_on_routers_count_native_tokens_and_share_them(secured):
    """Two routers, each on the router role's credentials: whichever reads a run's usage record
    tells the other, so every router then refuses; neither connection hears a permissions violation."""
    url, credentials, config = secured
    s = Subjects("lim")
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc))

    async with contextlib.AsyncExitStack() as stack:

        async def connect(role: str):
            options = credential_options(str(credentials.seed_file(role)))
            nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, **options)
            stack.push_async_callback(close, nc)
            return nc

        routers = [await stack.enter_async_context(Router(await connect("router"), s, config)) for _ in "ab"]
        model = config.model("m")
        await stack.enter_async_context(
            Worker(await connect("a-n0"), s, config.worker, model, "a", make_engine(model), worker_id="a-n0")
        )
        nat = await stack.enter_async_context(
            FirstClient(await connect("nat"), s, user="nat", request_timeout_s=5)
        )
        used = spent(await nat.complete("m", "chat", LONG))

        def every_router_counted() -> bool:
            now = time.monotonic()
            return all(r.native_limits.limiter.ledger.total_tokens.count("m", now) == used for r in routers)

        await eventually(every_router_counted, what="both routers to count nat's tokens")
        for _ in range(6):  # the queue group spreads them over both routers
            with pytest.raises(errors.RateLimited, match=MODEL_FULL):
                await nat.complete("m", "chat", SHORT)
        for r in routers:  # the server answers a flush after any violation before it
            await r.nc.flush()
        assert not [v for v in violations if "permissions violation" in v.lower()], violations
