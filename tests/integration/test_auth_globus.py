"""Globus tokens at the gateway: the gateway in this process with ``auth.methods = ["globus"]``, its
real globus-sdk calls answered by the Globus double (tests/globus_double.py), real HTTP in front,
and a router and workers on the session's nats-server where an answer is needed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
from aiohttp import web

from services.gateway import keys
from services.gateway.app import create_app
from services.gateway.auth import keys as key_auth
from services.gateway.auth.globus import GlobusAuthenticator
from services.worker.engines.openai_server import free_port
from shared import config as cfg
from shared import keystore
from shared.access_config import GlobusAuthConfig
from tests.globus_double import GlobusDouble, GlobusIdentity
from tests.integration.conftest import make_config
from tests.support import eventually

PHYSICS = "3f1e0c6a-0000-4000-8000-0000000000a1"  # a Globus group id
POLICY = "83732ff2-9c42-4548-b5ce-17e498c84f6a"
LOGIN_AGAIN = (
    "please logout from Globus by visiting https://app.globus.org/logout and re-authenticate with the "
    "following command: 'python3 inference_auth_token.py authenticate --force'."
)


@dataclass
class Gateway:
    app: web.Application
    config: cfg.Config
    url: str

    @property
    def authenticator(self) -> GlobusAuthenticator:
        return self.app[keys.AUTHENTICATORS][0]


@pytest.fixture
async def globus():
    async with GlobusDouble() as double:
        yield double


@pytest.fixture
async def gateway(services, subjects, globus, tmp_path):
    """``await gateway(models, **auth_globus_fields)``: a gateway that takes Globus tokens only
    (or the ``methods`` given), its globus-sdk pointed at the double; ``clusters`` replaces the
    two open clusters a and b."""
    secret = tmp_path / "globus-client-secret"
    secret.write_text(globus.client_secret + "\n")

    async def start(
        models: list[dict] = (), *, methods: list[str] = ("globus",), clusters: list[dict] = (), **fields
    ) -> Gateway:
        settings = {
            "client_id": globus.client_id,
            "client_secret_file": str(secret),
            "auth_url": globus.url,
            "groups_url": globus.url,
            **fields,
        }
        config = make_config(
            [dict(m) for m in models],
            nats={"subject_prefix": subjects.prefix},
            auth={"methods": list(methods), "globus": settings},
            **({"clusters": [dict(c) for c in clusters]} if clusters else {}),
        )
        app = create_app(config, services.nats_url)
        return Gateway(app, config, await services.gateway(app))

    return start


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get(http, gw: Gateway, path: str, token: str | None = None, **headers) -> tuple[int, dict, dict]:
    if token is not None:
        headers |= bearer(token)
    async with http.get(gw.url + path, headers=headers) as r:
        return r.status, await r.json(), dict(r.headers)


async def chat(http, gw: Gateway, model: str, token: str, **extra) -> tuple[int, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra}
    async with http.post(gw.url + "/v1/chat/completions", json=body, headers=bearer(token)) as r:
        return r.status, await r.json()


def refused(status: int, body: dict, expected_status: int, message: str) -> bool:
    code = {401: "unauthorized", 403: "permission_denied", 503: "no_capacity"}[expected_status]
    assert (status, body["error"]["code"], body["error"]["message"]) == (expected_status, code, message)
    return True


# --- the credential ------------------------------------------------------------------------------


async def test_a_request_without_a_credential_gets_firsts_401(gateway, http):
    gw = await gateway()
    status, body, _ = await get(http, gw, "/v1/models")
    assert refused(
        status,
        body,
        401,
        "Error: Missing ('Authorization': 'Bearer <your-access-token>') in request headers.",
    )


async def test_a_credential_that_is_not_bearer_gets_firsts_401(gateway, http, globus):
    gw = await gateway()
    token = globus.issue("alice@anl.gov")
    status, body, _ = await get(http, gw, "/v1/models", Authorization=f"Basic {token}")
    assert refused(
        status, body, 401, "Something went wrong while reading headers. Authorization type should be Bearer."
    )
    assert globus.introspections == 0


@pytest.mark.parametrize("how", ["forged", "revoked", "expired"])
async def test_a_token_globus_does_not_vouch_for_is_401(gateway, http, globus, how):
    """Globus answers ``active: false`` for a token it did not issue, a revoked and an expired one."""
    gw = await gateway()
    token = {
        "forged": "Ag" + "x" * 60,
        "revoked": globus.issue("alice@anl.gov"),
        "expired": globus.issue("alice@anl.gov", lifetime_s=-60),
    }[how]
    if how == "revoked":
        globus.revoke(token)
    status, body, _ = await get(http, gw, "/v1/whoami", token)
    assert refused(status, body, 401, "Token introspection: Token is either not active or invalid")


async def test_a_token_that_expires_while_cached_gets_access_token_expired(gateway, http, globus):
    gw = await gateway()
    token = globus.issue("alice@anl.gov", lifetime_s=1.5)
    assert (await get(http, gw, "/v1/whoami", token))[0] == 200
    expires = globus.tokens[token].exp
    await eventually(lambda: time.time() > expires, timeout=5, what="the token's expiry")
    status, body, _ = await get(http, gw, "/v1/whoami", token)
    assert refused(status, body, 401, "Access token expired.")
    assert globus.introspected[token] == 1  # told from the cache, not by asking Globus again


async def test_api_keys_are_not_taken_for_globus_tokens(gateway, http, globus):
    gw = await gateway()
    status, body, _ = await get(http, gw, "/v1/whoami", "first-abc123")
    assert refused(
        status, body, 401, "The credential is neither an API key of this service nor a Globus token."
    )
    assert globus.introspections == 0


# --- who the token stands for ----------------------------------------------------------------------------


async def test_the_identity_and_its_active_groups_are_in_whoami(gateway, http, globus):
    gw = await gateway(allowed_idp_domains=["anl.gov"])
    alice = GlobusIdentity("alice@anl.gov", "Alice Liddell", "Argonne National Laboratory")
    token = globus.issue(alice, groups={PHYSICS: "active", "g-other": "active", "g-invited": "invited"})
    status, body, _ = await get(http, gw, "/v1/whoami", token)
    assert status == 200
    assert {k: body[k] for k in ("user", "kind", "name", "username", "idp", "groups")} == {
        "user": alice.sub,
        "kind": "globus",
        "name": "Alice Liddell",
        "username": "alice@anl.gov",
        "idp": "anl.gov",
        "groups": [PHYSICS, "g-other"],  # an invitation is not a membership
    }
    status, first, _ = await get(http, gw, "/resource_server/whoami", token)
    assert status == 200 and first["user_group_uuids"] == [PHYSICS, "g-other"]
    assert first["auth_service"] == "globus" and first["id"] == alice.sub
    # FIRST's shape: the identity provider's Globus id and display name, from the identity set.
    assert (first["idp_id"], first["idp_name"]) == (alice.idp, "Argonne National Laboratory")
    assert globus.last_introspection["include"] == "session_info,identity_set_detail"


async def test_the_session_identity_from_an_allowed_domain_is_chosen(gateway, http, globus):
    """A Globus account with linked identities is the one of the session that an allowed IdP vouched for."""
    gw = await gateway(allowed_idp_domains=["anl.gov"])
    token = globus.issue("bob@gmail.com", "bob@anl.gov", session=["bob@gmail.com", "bob@anl.gov"])
    status, body, _ = await get(http, gw, "/v1/whoami", token)
    assert status == 200 and (body["username"], body["idp"]) == ("bob@anl.gov", "anl.gov")


async def test_a_session_from_another_identity_provider_is_403(gateway, http, globus):
    gw = await gateway(allowed_idp_domains=["anl.gov", "uchicago.edu"])
    token = globus.issue("bob@gmail.com", "bob@anl.gov", session=["bob@gmail.com"])
    status, body, _ = await get(http, gw, "/v1/whoami", token)
    assert refused(
        status,
        body,
        403,
        "Error: Permission denied. Must authenticate with anl.gov, uchicago.edu. Currently authenticated "
        f"as Bob (bob@gmail.com). If you are passing an access token directly to this API, {LOGIN_AGAIN}",
    )


async def test_an_identity_provider_that_requires_a_group_refuses_non_members(gateway, http, globus):
    gw = await gateway(allowed_idp_domains=["anl.gov", "gmail.com"], groups_per_idp={"gmail.com": [PHYSICS]})
    outsider = globus.issue(GlobusIdentity("eve@gmail.com", "Eve", "Google"), groups=["g-other"])
    status, body, _ = await get(http, gw, "/v1/whoami", outsider)
    assert refused(
        status,
        body,
        403,
        "Error: Permission denied. User (Eve - eve@gmail.com) not part of the Globus Groups applied for Google.",
    )
    member = globus.issue("dan@gmail.com", groups=[PHYSICS])
    assert (await get(http, gw, "/v1/whoami", member))[0] == 200
    no_group_needed = globus.issue("alice@anl.gov")
    assert (await get(http, gw, "/v1/whoami", no_group_needed))[0] == 200
    # Refusals name no domain that requires a group.
    stranger = globus.issue("mallory@example.org")
    status, body, _ = await get(http, gw, "/v1/whoami", stranger)
    assert (
        status == 403
        and "Must authenticate with anl.gov, or providers with approved projects."
        in (body["error"]["message"])
    )


async def test_a_user_in_none_of_the_required_groups_is_403(gateway, http, globus):
    gw = await gateway(groups=[PHYSICS, "g-chemistry"])
    status, body, _ = await get(http, gw, "/v1/whoami", globus.issue("alice@anl.gov", groups=["g-other"]))
    assert refused(status, body, 403, "Error: User is not a member of an allowed Globus Group.")
    status, _, _ = await get(http, gw, "/v1/whoami", globus.issue("carl@anl.gov", groups=["g-chemistry"]))
    assert status == 200


async def test_a_failed_policy_is_403_and_the_policies_go_to_globus(gateway, http, globus):
    gw = await gateway(allowed_idp_domains=["anl.gov"], policies=[POLICY])
    token = globus.issue("alice@anl.gov", policies={POLICY: False})
    status, body, _ = await get(http, gw, "/v1/whoami", token)
    assert refused(
        status,
        body,
        403,
        "Error: Permission denied from internal policies. This is likely due to a high-assurance timeout. "
        "Please logout by visiting https://app.globus.org/logout, and re-authenticate with the following "
        "command: 'python3 inference_auth_token.py authenticate --force'. Make sure you authenticate with "
        "an authorized identity provider: anl.gov.",
    )
    assert globus.last_introspection["authentication_policies"] == POLICY
    assert (await get(http, gw, "/v1/whoami", globus.issue("bob@anl.gov")))[0] == 200


async def test_a_username_that_cannot_be_recorded_is_401(gateway, http, globus):
    gw = await gateway()
    status, body, _ = await get(http, gw, "/v1/whoami", globus.issue("<script>@anl.gov"))
    assert refused(status, body, 401, "Username <script>@anl.gov includes non-authorized characters.")


async def test_a_listed_service_account_skips_the_session_checks(gateway, http, globus):
    """A client's own token has no session and meets no policy; listed, it is let in as itself."""
    client_id = "9a1b2c3d-0000-4000-8000-00000000b0b0"
    username = f"{client_id}@clients.auth.globus.org"
    gw = await gateway(allowed_idp_domains=["anl.gov"], policies=[POLICY], service_usernames=[username])
    token = globus.issue_service(client_id, "FIRST batch runner", groups=[PHYSICS])
    status, body, _ = await get(http, gw, "/v1/whoami", token)
    assert status == 200
    assert {k: body[k] for k in ("user", "kind", "name", "username", "idp", "groups")} == {
        "user": client_id,
        "kind": "globus_service",
        "name": "FIRST batch runner",
        "username": username,
        "idp": "clients.auth.globus.org",
        "groups": [PHYSICS],
    }
    status, first, _ = await get(http, gw, "/resource_server/whoami", token)
    assert (first["idp_id"], first["idp_name"]) == ("clients.auth.globus.org", "https://auth.globus.org")
    unlisted = globus.issue_service("0c0c0c0c-0000-4000-8000-000000000000", "someone else's client")
    status, body, _ = await get(http, gw, "/v1/whoami", unlisted)
    assert (
        status == 403
        and "Currently authenticated as Unknown (no active session found)." in body["error"]["message"]
    )


# --- what the identity may use --------------------------------------------------------------------------


async def test_a_model_open_to_a_group_is_hidden_and_refused_to_others_and_serves_members(
    gateway, http, globus, services
):
    gw = await gateway([{"id": "open"}, {"id": "physics", "allowed_groups": [PHYSICS]}])
    await services.router(gw.config)
    await services.worker(gw.config, "physics")
    member = globus.issue("alice@anl.gov", groups=[PHYSICS])
    other = globus.issue("bob@anl.gov", groups=["g-other"])

    _, listed, _ = await get(http, gw, "/v1/models", other)
    assert [m["id"] for m in listed["data"]] == ["open"]
    status, body = await chat(http, gw, "physics", other)
    assert (
        status == 403 and body["error"]["code"] == "permission_denied" and body["error"]["param"] == "model"
    )

    _, listed, _ = await get(http, gw, "/v1/models", member)
    assert [m["id"] for m in listed["data"]] == ["open", "physics"]
    status, body = await chat(http, gw, "physics", member)
    assert status == 200 and body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("where", ["model", "cluster"])
async def test_allowed_idp_domains_show_a_model_to_one_domain_and_refuse_it_to_another(
    gateway, http, globus, services, where
):
    """``allowed_idp_domains`` on the model, or on the only cluster that serves it."""
    if where == "model":
        models = [{"id": "open"}, {"id": "anl", "allowed_idp_domains": ["anl.gov"]}]
        clusters = [{"name": "a"}, {"name": "b"}]
    else:
        models = [{"id": "open", "clusters": ["a"]}, {"id": "anl", "clusters": ["b"]}]
        clusters = [{"name": "a"}, {"name": "b", "allowed_idp_domains": ["anl.gov"]}]
    gw = await gateway(models, clusters=clusters)
    await services.router(gw.config)
    await services.worker(gw.config, "anl", cluster="b")
    alice = globus.issue("alice@anl.gov")
    carl = globus.issue("carl@uchicago.edu")

    _, listed, _ = await get(http, gw, "/v1/models", carl)
    assert [m["id"] for m in listed["data"]] == ["open"]
    status, body = await chat(http, gw, "anl", carl)
    assert status == 403 and (body["error"]["code"], body["error"]["param"]) == ("permission_denied", "model")
    assert body["error"]["message"] == (
        "You may not use the model 'anl': it is open to other groups or identity providers (you signed in "
        "through uchicago.edu). Ask the service's administrators for access, or sign in with an identity "
        "they allow."
    )

    _, listed, _ = await get(http, gw, "/v1/models", alice)
    assert [m["id"] for m in listed["data"]] == ["open", "anl"]
    status, body = await chat(http, gw, "anl", alice)
    assert status == 200 and body["usage"]["completion_tokens"] == 3


async def test_whoami_shows_the_tokens_per_minute_of_each_model_the_caller_may_use(gateway, http, globus):
    gw = await gateway(
        [
            {"id": "open"},  # the default: 100,000 tokens/min for all its users together
            {"id": "physics", "allowed_groups": [PHYSICS], "tokens_per_min": 5000},
            {"id": "unlimited", "tokens_per_min": 0},
        ]
    )
    member = globus.issue("alice@anl.gov", groups=[PHYSICS])
    status, body, _ = await get(http, gw, "/v1/whoami", member)
    assert status == 200
    assert body["limits"]["models"] == {
        "open": {"tokens_per_min": 100_000},
        "physics": {"tokens_per_min": 5000},
    }
    assert body["limits"]["model_tokens_per_min"] == 60_000  # the user's own, per model
    status, body, _ = await get(http, gw, "/v1/whoami", globus.issue("bob@anl.gov"))
    assert status == 200 and body["limits"]["models"] == {"open": {"tokens_per_min": 100_000}}


# --- API keys and Globus tokens at one gateway -----------------------------------------------------------


async def test_one_gateway_takes_api_keys_and_globus_tokens_each_as_what_it_is(
    gateway, http, globus, nc, subjects
):
    """``auth.methods = ["keys", "globus"]``: the key bucket on the session's nats-server (written
    as ``first keys create`` writes it), Globus through the double."""
    bucket = keystore.bucket_name(make_config([{"id": "m"}], nats={"subject_prefix": subjects.prefix}))
    kv = await keystore.open_bucket(nc.jetstream(), bucket, create=True)
    try:
        key, key_id, _ = await keystore.create(kv, "batch-runner", ["physics"])
        gw = await gateway([{"id": "m"}], methods=["keys", "globus"])
        token = globus.issue("alice@anl.gov", groups=[PHYSICS])

        status, body, _ = await get(http, gw, "/v1/whoami", key)
        assert status == 200
        assert (body["user"], body["kind"], body["key_id"], body["groups"]) == (
            "batch-runner", "key", key_id, ["physics"]
        )  # fmt: skip
        assert globus.introspections == 0  # a key is never sent to Globus
        status, body, _ = await get(http, gw, "/resource_server/whoami", key)
        assert status == 200 and (body["id"], body["auth_service"]) == ("batch-runner", "key")

        status, body, _ = await get(http, gw, "/v1/whoami", token)
        assert status == 200
        assert (body["kind"], body["username"], body["groups"]) == ("globus", "alice@anl.gov", [PHYSICS])
        status, body, _ = await get(http, gw, "/resource_server/whoami", token)
        assert status == 200 and (body["username"], body["auth_service"]) == ("alice@anl.gov", "globus")

        # Neither: a string Globus does not vouch for, a key of another form, a key nobody made.
        status, body, _ = await get(http, gw, "/v1/whoami", "not-a-token")
        assert refused(status, body, 401, "Token introspection: Token is either not active or invalid")
        status, body, _ = await get(http, gw, "/v1/whoami", "first-nonsense")
        assert refused(status, body, 401, key_auth.MALFORMED)
        unknown, _, _ = keystore.new_key()
        status, body, _ = await get(http, gw, "/v1/whoami", unknown)
        assert refused(status, body, 401, key_auth.UNKNOWN)
        assert globus.introspections == 1  # the token: "not-a-token" is too short to be one
    finally:
        await nc.jetstream().delete_key_value(bucket)


# --- caching, single flight, Globus down ----------------------------------------------------------------


async def test_a_good_token_is_introspected_once_until_cache_s(gateway, http, globus):
    gw = await gateway(cache_s=0.5)
    token = globus.issue("alice@anl.gov")
    for _ in range(3):
        assert (await get(http, gw, "/v1/whoami", token))[0] == 200
    assert globus.introspected[token] == 1

    async def asked_again() -> bool:
        assert (await get(http, gw, "/v1/whoami", token))[0] == 200
        return globus.introspected[token] == 2

    await eventually(asked_again, timeout=5, what="a new introspection once cache_s is over")


async def test_a_refusal_is_repeated_from_the_cache_until_failure_cache_s(gateway, http, globus):
    gw = await gateway(failure_cache_s=0.5, allowed_idp_domains=["anl.gov"])
    token = globus.issue("bob@gmail.com")
    first = await get(http, gw, "/v1/whoami", token)
    again = await get(http, gw, "/v1/whoami", token)
    assert first[0] == 403 and first[:2] == again[:2]
    assert globus.introspected[token] == 1

    async def asked_again() -> bool:
        assert (await get(http, gw, "/v1/whoami", token))[:2] == first[:2]
        return globus.introspected[token] == 2

    await eventually(asked_again, timeout=5, what="a new introspection once failure_cache_s is over")


async def test_concurrent_requests_with_one_new_token_share_one_introspection(gateway, http, globus):
    gw = await gateway()
    token = globus.issue("alice@anl.gov", groups=[PHYSICS])
    globus.hold.clear()  # Globus takes its time answering
    requests = [asyncio.create_task(get(http, gw, "/v1/whoami", token)) for _ in range(10)]
    await eventually(lambda: gw.authenticator.waiting == 10, what="ten requests waiting on the look-up")
    assert globus.introspecting == 1
    globus.hold.set()
    answers = await asyncio.gather(*requests)
    assert [a[0] for a in answers] == [200] * 10 and {a[1]["groups"][0] for a in answers} == {PHYSICS}
    assert globus.introspected[token] == 1


async def test_globus_failing_is_503_with_retry_after_and_refuses_no_token(gateway, http, globus):
    gw = await gateway()
    token = globus.issue("alice@anl.gov")
    globus.outage = 503
    status, body, headers = await get(http, gw, "/v1/whoami", token)
    assert status == 503 and body["error"]["code"] == "no_capacity" and headers["Retry-After"] == "5"
    assert "try again shortly" in body["error"]["message"]
    globus.outage = None  # Globus is back: the token was not refused for the outage
    assert (await get(http, gw, "/v1/whoami", token))[0] == 200


async def test_globus_unreachable_is_503_with_retry_after(gateway, http, globus):
    nobody = f"http://127.0.0.1:{free_port()}/"
    gw = await gateway(auth_url=nobody, groups_url=nobody, http_timeout_s=2)
    status, body, headers = await get(http, gw, "/v1/whoami", globus.issue("alice@anl.gov"))
    assert status == 503 and body["error"]["code"] == "no_capacity" and headers["Retry-After"] == "5"
    assert "cannot be reached" in body["error"]["message"]


async def test_a_gateway_whose_client_secret_globus_refuses_answers_503_not_401(
    gateway, http, globus, tmp_path
):
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret")
    gw = await gateway(client_secret_file=str(wrong))
    token = globus.issue("alice@anl.gov")
    for _ in range(2):  # not cached against the token
        status, body, _ = await get(http, gw, "/v1/whoami", token)
        assert status == 503 and "refused this gateway's client credentials" in body["error"]["message"]


async def test_a_missing_or_empty_secret_file_stops_the_start(globus, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path, why in [(tmp_path / "nope", "cannot read"), (empty, "is empty"), ("", "required")]:
        settings = GlobusAuthConfig(client_id=globus.client_id, client_secret_file=str(path))
        with pytest.raises(cfg.ConfigError, match=rf"^\$\.auth\.globus\.client_secret_file: .*{why}"):
            await GlobusAuthenticator(settings).start()


# --- a token that expires during a stream ---------------------------------------------------------------


async def test_a_stream_outlives_its_token_and_the_token_is_then_refused(gateway, http, globus, services):
    """Admission is checked once: a stream admitted before its token expires runs to its end."""
    slow = {"kind": "sim", "ttft_ms": 1, "itl_ms": 150}  # about 20 words: 3 s, past the token's expiry
    gw = await gateway([{"id": "m", "engine": slow}])
    await services.router(gw.config)
    await services.worker(gw.config, "m")
    token = globus.issue("alice@anl.gov", lifetime_s=1.5)
    expires = globus.tokens[token].exp
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 200,  # more than the simulator's natural answer: it ends with "stop"
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(gw.url + "/v1/chat/completions", json=body, headers=bearer(token)) as stream:
        assert stream.status == 200
        assert (await stream.content.readline()).startswith(b"data: ")
        await eventually(lambda: time.time() > expires, timeout=5, what="the token's expiry")
        status, refusal, _ = await get(http, gw, "/v1/whoami", token)
        assert refused(status, refusal, 401, "Access token expired.")
        rest = await stream.read()
        ended = time.time()
    events = [line.removeprefix(b"data: ") for line in rest.split(b"\n") if line.startswith(b"data: ")]
    assert ended > expires and events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"  # its natural end
    assert chunks[-1]["usage"]["completion_tokens"] > 10


# --- Globus failing at the groups step ------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["dependent_token", "my_groups"])
async def test_globus_failing_at_the_groups_step_is_503_with_retry_after_and_refuses_no_token(
    gateway, http, globus, endpoint
):
    """Introspection passes, then the dependent-token grant or the Groups API answers 500."""
    gw = await gateway()
    token = globus.issue("alice@anl.gov", groups=[PHYSICS])
    globus.failing[endpoint] = 500
    status, body, headers = await get(http, gw, "/v1/whoami", token)
    assert refused(
        status, body, 503, "Globus is failing (500) and cannot check the token now; try again shortly."
    )
    assert headers["Retry-After"] == "5"
    del globus.failing[endpoint]  # Globus is back: the token was not refused for its failure
    status, body, _ = await get(http, gw, "/v1/whoami", token)
    assert status == 200 and body["groups"] == [PHYSICS]


async def test_a_dependent_token_grant_that_refuses_the_gateway_is_503_for_the_operators(
    gateway, http, globus
):
    """The token endpoint's 401 is about the gateway's own client (invalid_client), not the token."""
    gw = await gateway()
    token = globus.issue("alice@anl.gov")
    globus.failing["dependent_token"] = 401
    for _ in range(2):  # not cached against the token
        status, body, headers = await get(http, gw, "/v1/whoami", token)
        assert refused(
            status,
            body,
            503,
            "Token introspection: Globus Auth refused this gateway's client credentials "
            "(auth.globus.client_id and its secret); the operators must fix them.",
        )
        assert headers["Retry-After"] == "5"
    assert globus.introspected[token] == 2
    del globus.failing["dependent_token"]
    assert (await get(http, gw, "/v1/whoami", token))[0] == 200


async def test_a_groups_api_that_refuses_the_groups_token_is_firsts_401(gateway, http, globus):
    gw = await gateway()
    token = globus.issue("alice@anl.gov")
    globus.failing["my_groups"] = 401
    status, body, _ = await get(http, gw, "/v1/whoami", token)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert body["error"]["message"].startswith(
        "Token introspection: Error: Could not recover user group memberships. Globus answered 401"
    )
