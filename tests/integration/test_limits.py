"""Request and token limits through real gateways, a router and sim workers on the session's
nats-server. Callers log in with a test-only authenticator ("Bearer alice" is alice) that takes
the place of the configured ones; everything else is the real gateway.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from services.gateway.app import create_app
from services.gateway.limits import LIMITER
from shared import schema
from tests.integration.conftest import make_config, table_auth
from tests.support import eventually

IDENTITIES = {
    "alice": schema.Identity(user="alice", kind="key"),
    "bob": schema.Identity(user="bob", kind="key"),
    "carol": schema.Identity(user="carol", kind="globus", groups=["big"]),
}
RATE_HEADERS = {
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
}
LONG = " ".join(["word"] * 32)  # the sim counts a token per word: over 30 in one request
NO_LIMITS = {"requests_per_s": 0, "model_requests_per_s": 0, "tokens_per_min": 0, "model_tokens_per_min": 0}


def limited_config(subjects, limits: dict, *, model_tpm: int = 0):
    return make_config(
        [{"id": "m", "tokens_per_min": model_tpm, "engine": {"kind": "sim", "ttft_ms": 0, "itl_ms": 0}}],
        nats={"subject_prefix": subjects.prefix},
        auth={"methods": ["keys"]},
        limits={"user": {**NO_LIMITS, **limits.pop("user", {})}, **limits},
    )


class Gateway:
    def __init__(self, app, url: str, http: aiohttp.ClientSession):
        self.app, self.url, self.http = app, url, http

    async def ask(
        self,
        user: str | None,
        *,
        stream: bool = False,
        max_tokens: int = 4,
        prompt: str = "hi",
        model: str = "m",
    ):
        """(status, headers, body) of one chat completion; a stream's body is its raw events."""
        headers = {"Authorization": f"Bearer {user}"} if user else {}
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        if stream:
            body["stream"] = True
        async with self.http.post(self.url + "/v1/chat/completions", json=body, headers=headers) as r:
            return r.status, r.headers, await r.read()

    async def whoami(self, user: str) -> dict:
        async with self.http.get(self.url + "/v1/whoami", headers={"Authorization": f"Bearer {user}"}) as r:
            assert r.status == 200
            return await r.json()


@pytest.fixture
async def stack(services):
    """``await stack(config, gateways=1)``: a router, a sim worker for model m, and gateways."""
    async with aiohttp.ClientSession() as http:

        async def start(config, gateways: int = 1, *, tabled: bool = True) -> list[Gateway]:
            await services.router(config)
            await services.worker(config, "m")
            out = []
            for _ in range(gateways):
                app = create_app(config, services.nats_url)
                if tabled:  # in place of the configured authenticators
                    table_auth(app, IDENTITIES)
                out.append(Gateway(app, await services.gateway(app), http))
            return out

        yield start


def names(headers) -> set[str]:
    return {h.lower() for h in headers}


def used_tokens(body: bytes) -> int:
    usage = orjson.loads(body)["usage"]
    return usage["prompt_tokens"] + usage["completion_tokens"]


async def model_tokens_seen(gateway: Gateway, user: str) -> int:
    return (await gateway.whoami(user))["usage"]["models"].get("m", {}).get("tokens_per_min", 0)


async def test_a_user_over_requests_per_s_gets_429_with_retry_after_while_another_user_is_served(
    stack, subjects
):
    (gw,) = await stack(limited_config(subjects, {"user": {"requests_per_s": 2}}))
    answers = await asyncio.gather(*(gw.ask("alice") for _ in range(5)))  # within the same second
    assert sorted(status for status, _, _ in answers) == [200, 200, 429, 429, 429]
    status, headers, body = next(a for a in answers if a[0] == 429)
    error = orjson.loads(body)["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "at most 2 requests/s per user" in error["message"]
    assert headers["Retry-After"] in {"1", "2"}  # the window holds a request 1.0 to 1.1 s
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("2", "0")
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert not any(h.startswith("x-ratelimit-") and h.endswith("-tokens") for h in names(headers))
    status, headers, _ = await gw.ask("bob")
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "1"


async def test_a_streamed_request_over_the_limit_gets_a_plain_429_before_any_event(stack, subjects):
    (gw,) = await stack(limited_config(subjects, {"user": {"requests_per_s": 1}}))
    answers = await asyncio.gather(gw.ask("alice", stream=True), gw.ask("alice", stream=True))
    refused = next(a for a in answers if a[0] == 429)
    assert refused[1]["Content-Type"].startswith("application/json") and "Retry-After" in refused[1]


async def test_every_answer_carries_the_rate_limit_headers_streamed_or_not(stack, subjects):
    config = limited_config(subjects, {"user": {"requests_per_s": 10, "model_tokens_per_min": 1000}})
    (gw,) = await stack(config)
    status, headers, body = await gw.ask("alice")
    assert status == 200 and RATE_HEADERS <= names(headers)
    assert headers["x-ratelimit-limit-requests"] == "10" and headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-limit-tokens"] == "1000" and headers["x-ratelimit-remaining-tokens"] == "1000"
    spent = used_tokens(body)
    await eventually(lambda: model_tokens_seen(gw, "alice"), what="alice's answer counted")
    status, headers, body = await gw.ask("alice", stream=True)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert RATE_HEADERS <= names(headers) and body.endswith(b"data: [DONE]\n\n")
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - spent)
    assert headers["x-ratelimit-reset-tokens"].endswith("s") and "m" in headers["x-ratelimit-reset-tokens"]
    status, headers, _ = await gw.ask("alice", model="nope")  # refused later, by the router
    assert status == 404 and headers["x-ratelimit-remaining-requests"] == "7"


async def test_tokens_per_min_per_user_and_model_count_from_answers_on_every_gateway(stack, subjects):
    """Alice spends her tokens through gateway A; gateway B, which never saw her, refuses her."""
    config = limited_config(subjects, {"user": {"model_tokens_per_min": 30}})
    a, b = await stack(config, gateways=2)
    status, _, body = await a.ask("alice", prompt=LONG)
    assert status == 200 and used_tokens(body) >= 30
    await eventually(lambda: model_tokens_seen(b, "alice"), what="gateway B to hear alice's usage")
    assert await model_tokens_seen(b, "alice") == used_tokens(body)
    status, headers, body = await b.ask("alice")
    assert (
        status == 429 and "30 tokens/min per user for the model 'm'" in orjson.loads(body)["error"]["message"]
    )
    assert 60 <= int(headers["Retry-After"]) <= 63 and headers["x-ratelimit-remaining-tokens"] == "0"
    assert (await b.ask("bob"))[0] == 200  # per user


async def test_a_models_tokens_per_min_counts_all_its_users_together(stack, subjects):
    (gw,) = await stack(limited_config(subjects, {}, model_tpm=30))
    status, _, body = await gw.ask("alice", prompt=LONG)
    assert status == 200 and used_tokens(body) >= 30
    await eventually(lambda: model_tokens_seen(gw, "alice"), what="alice's answer counted")
    status, headers, body = await gw.ask("bob")  # bob has spent nothing himself
    assert status == 429 and "the model 'm' serves 30 tokens/min to all users together" in body.decode()
    assert headers["x-ratelimit-limit-tokens"] == "30"


async def test_a_stream_counts_its_tokens_whether_or_not_it_shows_them(stack, subjects):
    (gw,) = await stack(limited_config(subjects, {}))
    status, _, body = await gw.ask("alice", stream=True, max_tokens=6)
    assert status == 200 and b"[DONE]" in body and b'"usage"' not in body
    await eventually(lambda: _is(model_tokens_seen(gw, "alice"), 1 + 6), what="the stream's tokens")


async def test_a_stream_whose_caller_left_counts_the_text_that_reached_it(stack, subjects):
    config = limited_config(subjects, {})
    config.models[0].engine.itl_ms = 20  # 200 tokens take 4 s: the caller leaves long before
    (gw,) = await stack(config)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
    async with gw.http.post(
        gw.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer bob"}
    ) as r:
        assert r.status == 200
        while b"data: {" not in await r.content.readline():  # the first event with text, then hang up
            pass
    await eventually(lambda: _at_least(model_tokens_seen(gw, "bob"), 1), what="bob's cut stream counted")
    assert await model_tokens_seen(gw, "bob") < 100


async def _is(value, expected) -> bool:
    return await value == expected


async def _at_least(value, least) -> bool:
    return await value >= least


async def test_requests_admitted_by_one_gateway_count_at_the_others(stack, subjects):
    a, b = await stack(limited_config(subjects, {"user": {"requests_per_s": 2}}), gateways=2)
    assert [s for s, _, _ in await asyncio.gather(a.ask("alice"), a.ask("alice"))] == [200, 200]

    async def b_counted_them() -> bool:
        return (await b.whoami("alice"))["usage"]["requests_per_s"] >= 2

    await eventually(b_counted_them, interval=0.01, what="gateway A's summary to reach B")
    status, _, body = await b.ask("alice")
    assert status == 429 and b"2 requests/s per user" in body


async def test_a_group_override_gives_its_members_more(stack, subjects):
    config = limited_config(
        subjects, {"user": {"requests_per_s": 1}, "groups": {"big": {"requests_per_s": 3}}}
    )
    (gw,) = await stack(config)
    assert (await gw.whoami("carol"))["limits"]["requests_per_s"] == 3
    carol, alice = await asyncio.gather(
        asyncio.gather(*(gw.ask("carol") for _ in range(4))),
        asyncio.gather(*(gw.ask("alice") for _ in range(2))),
    )
    assert sorted(s for s, _, _ in carol) == [200, 200, 200, 429]
    assert sorted(s for s, _, _ in alice) == [200, 429]


async def test_the_anonymous_caller_of_an_open_deployment_is_never_limited(stack, subjects):
    config = make_config(
        [{"id": "m", "tokens_per_min": 1, "engine": {"kind": "sim", "ttft_ms": 0, "itl_ms": 0}}],
        nats={"subject_prefix": subjects.prefix},
        limits={"user": {"requests_per_s": 1, "model_tokens_per_min": 1}},
    )
    (gw,) = await stack(config, tabled=False)
    assert LIMITER not in gw.app  # nothing is counted at all
    answers = await asyncio.gather(*(gw.ask(None) for _ in range(12)))
    assert all(status == 200 for status, _, _ in answers)
    assert not RATE_HEADERS & names(answers[0][1])


async def test_the_limiter_survives_garbage_on_its_subjects(stack, subjects, nc):
    config = limited_config(subjects, {"user": {"model_tokens_per_min": 30}})
    (gw,) = await stack(config)
    for subject in (subjects.usage, subjects.limits):
        await nc.publish(subject, b"\x00garbage")
        await nc.publish(subject, schema.encode(schema.Cancel(request_id="r")))  # a message of another kind
    await nc.flush()
    assert (await gw.ask("alice", prompt=LONG))[0] == 200
    await eventually(lambda: model_tokens_seen(gw, "alice"), what="the usage record after the garbage")
    assert (await gw.ask("alice"))[0] == 429
