"""A flood of made-up credentials at a gateway that takes Globus tokens: the gateway in this process,
its real globus-sdk calls answered by the Globus double (tests/globus_double.py, standing in for
Globus's cloud, which cannot run here), real HTTP in front. What cannot be a token never reaches
Globus; past ``auth.max_failures_per_min`` an address's new credentials get 429 and Globus hears
no more of them, while a token already known good keeps working."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from services.gateway.app import create_app
from services.gateway.auth.globus import INACTIVE
from tests.integration.conftest import make_config
from tests.integration.test_auth_globus import Gateway, bearer, get, globus, http  # noqa: F401
from tests.support import eventually


@pytest.fixture
async def guarded(services, subjects, globus, tmp_path):  # noqa: F811
    """``await guarded(max_failures, trusted_proxies=[...])``: a Globus-only gateway with that bound."""
    secret = tmp_path / "globus-client-secret"
    secret.write_text(globus.client_secret + "\n")

    async def start(max_failures: int, trusted_proxies: list[str] = ()) -> Gateway:
        config = make_config(
            [],
            nats={"subject_prefix": subjects.prefix},
            gateway={"trusted_proxies": list(trusted_proxies)},
            auth={
                "methods": ["globus"],
                "max_failures_per_min": max_failures,
                "globus": {
                    "client_id": globus.client_id,
                    "client_secret_file": str(secret),
                    "auth_url": globus.url,
                    "groups_url": globus.url,
                },
            },
        )
        app = create_app(config, services.nats_url)
        return Gateway(app, config, await services.gateway(app))

    return start


def forged() -> str:
    """A token of the right shape that Globus never issued."""
    return "Ag" + secrets.token_urlsafe(48)


async def whoami(http, gw: Gateway, token: str, client: str | None = None) -> tuple[int, dict, dict]:  # noqa: F811
    """GET /v1/whoami; ``client``: the address a trusted proxy says the request came from."""
    return await get(http, gw, "/v1/whoami", token, **({"X-Forwarded-For": client} if client else {}))


def throttled(status: int, body: dict, headers: dict) -> bool:
    assert (status, body["error"]["type"], body["error"]["code"]) == (
        429, "rate_limit_error", "rate_limit_exceeded"
    )  # fmt: skip
    assert 1 <= int(headers["Retry-After"]) <= 60
    return True


@pytest.mark.parametrize(
    "credential",
    [
        "null",
        "undefined",
        "A" * 2049,
        "Ag" + "x" * 60 + "!",
        "Ag" + "x" * 60 + "<script>",
        "Ag" + "x" * 20 + "%",
    ],
    ids=["null", "undefined", "too-long", "bang", "markup", "percent"],
)
async def test_what_cannot_be_a_token_is_401_and_never_reaches_globus(guarded, http, globus, credential):  # noqa: F811
    gw = await guarded(60)
    status, body, _ = await whoami(http, gw, credential)
    assert (status, body["error"]["code"], body["error"]["message"]) == (401, "unauthorized", INACTIVE)
    assert globus.introspections == 0


async def test_a_forged_token_of_any_bearer_form_is_still_asked_of_globus(guarded, http, globus):  # noqa: F811
    """The shape check refuses only what cannot be a token: RFC 6750's whole alphabet goes through."""
    gw = await guarded(60)
    token = "Ag-._~+/" + secrets.token_urlsafe(40) + "=="
    status, body, _ = await whoami(http, gw, token)
    assert (status, body["error"]["message"]) == (401, INACTIVE)
    assert globus.introspected[token] == 1


async def test_past_the_limit_an_address_gets_429_and_globus_hears_no_more(guarded, http, globus):  # noqa: F811
    gw = await guarded(5)
    alice = globus.issue("alice@anl.gov")
    assert (await whoami(http, gw, alice))[0] == 200
    for _ in range(4):
        assert (await whoami(http, gw, forged()))[0] == 401
    assert (await whoami(http, gw, "null"))[0] == 401  # a refused shape counts as a failure too
    assert globus.introspections == 5  # alice, and the 4 forged tokens

    for _ in range(20):
        assert throttled(*await whoami(http, gw, forged()))
    # Not behind a trusted proxy: a flooder's own X-Forwarded-For changes nothing.
    assert throttled(*await whoami(http, gw, forged(), client="203.0.113.5"))
    assert globus.introspections == 5

    # A token already known good keeps working from the same address (a neighbour behind one NAT)...
    status, body, _ = await whoami(http, gw, alice)
    assert (status, body["username"]) == (200, "alice@anl.gov")
    # ...but a token the gateway has not seen yet waits out the window like the flood.
    assert throttled(*await whoami(http, gw, globus.issue("bob@anl.gov")))
    assert globus.introspections == 5


async def test_a_concurrent_flood_costs_no_more_globus_calls_than_the_limit(guarded, http, globus):  # noqa: F811
    """Look-ups in flight count against the bound: 30 forged tokens at once, 5 reach Globus."""
    gw = await guarded(5)
    globus.hold.clear()  # Globus answers nothing until the rest have been turned away
    flood = [asyncio.create_task(whoami(http, gw, forged())) for _ in range(30)]
    await eventually(lambda: sum(t.done() for t in flood) == 25, timeout=10, what="25 requests refused")
    assert globus.introspecting == 5
    for task in flood:
        if task.done():
            status, body, headers = task.result()
            assert throttled(status, body, headers) and headers["Retry-After"] == "1"
    globus.hold.set()
    statuses = sorted(status for status, _, _ in await asyncio.gather(*flood))
    assert statuses == [401] * 5 + [429] * 25
    assert throttled(*await whoami(http, gw, forged()))
    assert globus.introspections == 5


async def test_behind_a_trusted_proxy_each_client_address_has_its_own_bound(guarded, http, globus):  # noqa: F811
    gw = await guarded(3, trusted_proxies=["127.0.0.1"])
    flooder = "198.51.100.7"
    for _ in range(3):
        assert (await whoami(http, gw, forged(), client=flooder))[0] == 401
    assert throttled(*await whoami(http, gw, forged(), client=flooder))
    # The proxy appends the address it saw: what the flooder wrote before it is not believed.
    assert throttled(*await whoami(http, gw, forged(), client=f"203.0.113.5, {flooder}"))
    # Another client's new token is looked up as usual.
    status, body, _ = await whoami(http, gw, globus.issue("carol@anl.gov"), client="203.0.113.5")
    assert (status, body["username"]) == (200, "carol@anl.gov")
    assert globus.introspections == 4


async def test_with_the_bound_off_every_failure_is_looked_up(guarded, http, globus):  # noqa: F811
    gw = await guarded(0)
    for _ in range(8):
        assert (await whoami(http, gw, forged()))[0] == 401
    assert globus.introspections == 8
