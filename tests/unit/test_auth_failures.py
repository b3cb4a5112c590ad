"""The bound on failed credentials (services/gateway/auth/failures.py), on a clock the test turns:
the shape a Globus token may take, the window per address, look-ups in flight, the bound on
addresses remembered, the address a failure counts against, the one log line per window, and
the config that sets it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from multidict import CIMultiDict
from structlog.testing import capture_logs

from services.gateway.auth.failures import (
    BUSY_RETRY_S,
    WINDOW_S,
    FailureGuard,
    _Proxies,
    address_key,
    token_shaped,
)
from shared import errors
from shared.config import ConfigError, load_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard(limit: int = 3, **kwargs) -> tuple[FailureGuard, Clock]:
    clock = Clock()
    return FailureGuard([], limit, clock=clock, **kwargs), clock


def fail(g: FailureGuard, address: str, token: int) -> None:
    """One look-up that ends in 401, as FailureGuard.identify runs it."""
    window = g.admit(address, token)
    g.failed(address, window)
    g.landed(address, window, token)


# --- the shape of a token --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        # Globus access tokens as globus-sdk hands them out (opaque, alphanumeric, ~70-100 chars)
        "AgwlE6vQ5m77vplnPKjbE5K2ObvMD9zmeNerv5prkjzb8XbnVbulCE6z8OD5DKpm4Ov4XKY4jlP6VjF8Gwl4vi2D4GPiwn523FWJ7wX",
        "Ag9rNkGq8Dk2B17ykVbzpjerjYmK1kBYMgqPOnmdx55rON3NOqFpC4YBnyo4YrjxyrXpvJW4lpo74JHBYPw60IqX0Pa",
        "Ag" + "Zz09" * 12,  # the ~48 characters of older tokens
        # whatever else RFC 6750 lets a bearer token be: base64(url), padding, a JWT's dots
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJlLXdpdGgtXy1hbmQtfg",
        "abc+def/ghi~jkl_mno-pq==",
        "A" * 2048,
    ],
)
def test_anything_a_bearer_token_may_be_is_token_shaped(token):
    assert token_shaped(token)


@pytest.mark.parametrize(
    "credential",
    [
        "",
        "null",
        "undefined",
        "short-but-ok-15",  # 15 characters: less than any 96-bit secret
        "A" * 2049,
        "Ag" + "x" * 40 + "!",
        "Ag" + "x" * 40 + '"',
        "Ag" + "x" * 40 + "é",
        "Ag" + "x" * 20 + " " + "x" * 20,
        "=Agxxxxxxxxxxxxxxxxxxxxxxx",  # padding only at the end
        "Agxxxxxxxxxxxxxxxxxxxxxxx\n",
    ],
)
def test_what_cannot_be_a_bearer_token_is_not_token_shaped(credential):
    assert not token_shaped(credential)


# --- the window --------------------------------------------------------------------------------


def test_after_the_limit_an_address_is_refused_until_its_window_passes():
    g, clock = guard(limit=3)
    for token in range(3):
        clock.now += 5
        fail(g, "198.51.100.7", token)
    clock.now += 10  # 20 s into the window that began with the first failure
    with pytest.raises(errors.RateLimited) as refused:
        g.admit("198.51.100.7", 99)
    assert refused.value.retry_after_s == pytest.approx(WINDOW_S - 20)
    assert "(3 in the last minute)" in refused.value.message
    g.admit("203.0.113.1", 99)  # another address is not held to it
    clock.now += WINDOW_S - 20 - 0.001
    with pytest.raises(errors.RateLimited):
        g.admit("198.51.100.7", 99)
    clock.now += 0.002
    g.admit("198.51.100.7", 99)  # the window passed: a fresh one


def test_failures_below_the_limit_refuse_nothing_and_a_new_window_forgets_them():
    g, clock = guard(limit=3)
    fail(g, "198.51.100.7", 1)
    fail(g, "198.51.100.7", 2)
    clock.now += WINDOW_S
    fail(g, "198.51.100.7", 3)
    fail(g, "198.51.100.7", 4)
    g.admit("198.51.100.7", 5)  # 2 in this window, not 4


def test_look_ups_in_flight_count_once_per_credential():
    """A concurrent flood is held to the limit too; many requests with one new token are one look-up."""
    g, _ = guard(limit=3)
    windows = [g.admit("198.51.100.7", token) for token in (1, 2, 3)]
    with pytest.raises(errors.RateLimited) as refused:
        g.admit("198.51.100.7", 4)
    assert refused.value.retry_after_s == BUSY_RETRY_S
    assert g.admit("198.51.100.7", 2) is windows[1]  # joins the look-up already in flight
    g.landed("198.51.100.7", windows[0], 1)
    g.admit("198.51.100.7", 4)  # a slot freed


def test_a_good_look_up_leaves_nothing_behind():
    g, _ = guard(limit=3)
    window = g.admit("198.51.100.7", 1)
    assert len(g) == 1
    g.landed("198.51.100.7", window, 1)
    assert len(g) == 0


def test_addresses_remembered_are_bounded_and_the_least_recently_seen_go_first():
    g, _ = guard(limit=2, max_addresses=3)
    for token in (1, 2):
        fail(g, "10.0.0.1", token)
    for i in range(2, 5):
        fail(g, f"10.0.0.{i}", 1)
        assert len(g) <= 3
    assert len(g) == 3
    g.admit("10.0.0.1", 3)  # forgotten: admitted again

    g, _ = guard(limit=2, max_addresses=3)
    for token in (1, 2):
        fail(g, "10.0.0.1", token)
    fail(g, "10.0.0.2", 1)
    fail(g, "10.0.0.3", 1)
    with pytest.raises(errors.RateLimited):
        g.admit("10.0.0.1", 3)  # a refusal counts as seen: it stays the most recent
    fail(g, "10.0.0.4", 1)
    with pytest.raises(errors.RateLimited):
        g.admit("10.0.0.1", 3)


def test_one_warning_per_address_and_window_and_never_the_token():
    g, clock = guard(limit=2)
    with capture_logs() as logs:
        for token in (1, 2):
            fail(g, "198.51.100.7", token)
        for _ in range(5):
            with pytest.raises(errors.RateLimited):
                g.admit("198.51.100.7", 3)
        clock.now += WINDOW_S
        # Two requests with one token share a slot in flight: 3 failures land, one line still.
        looked_up = [(token, g.admit("198.51.100.7", token)) for token in (4, 4, 5)]
        for token, window in looked_up:
            g.failed("198.51.100.7", window)
            g.landed("198.51.100.7", window, token)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [(e["event"], e["address"], e["failures"]) for e in warnings] == [
        ("auth_failures_throttled", "198.51.100.7", 2),
        ("auth_failures_throttled", "198.51.100.7", 2),
    ]
    assert set(warnings[0]) == {"event", "log_level", "address", "failures", "window_s", "retry_after_s"}


# --- whose failure it is -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, key",
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),  # one host's /64 is one address
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("", ""),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_failures_count_against_an_ipv4_address_or_an_ipv6_64(address, key):
    assert address_key(address) == key


@dataclass
class Request:
    """What _Proxies reads of an aiohttp request: its peer and its headers."""

    remote: str
    headers: CIMultiDict = field(default_factory=CIMultiDict)


def forwarded(remote: str, hops: str) -> Request:
    return Request(remote, CIMultiDict({"X-Forwarded-For": hops}))


def test_x_forwarded_for_is_read_only_from_a_trusted_proxy_and_its_last_untrusted_hop():
    none = _Proxies([])
    assert none.client(forwarded("198.51.100.7", "203.0.113.5")) == "198.51.100.7"
    proxies = _Proxies(["127.0.0.1", "10.0.0.0/8"])
    assert proxies.client(forwarded("198.51.100.7", "203.0.113.5")) == "198.51.100.7"  # not a proxy
    assert proxies.client(forwarded("127.0.0.1", "203.0.113.5")) == "203.0.113.5"
    # A client's own X-Forwarded-For is on the left: the hop our proxies added is believed.
    assert proxies.client(forwarded("127.0.0.1", "1.1.1.1, 203.0.113.5, 10.1.2.3")) == "203.0.113.5"
    assert proxies.client(forwarded("127.0.0.1", "garbage, 10.1.2.3")) == "10.1.2.3"
    assert proxies.client(forwarded("127.0.0.1", "10.1.2.3")) == "10.1.2.3"  # all trusted: the first
    assert proxies.client(Request("127.0.0.1")) == "127.0.0.1"  # no header: the proxy itself
    assert proxies.client(forwarded("127.0.0.1", "2001:db8::5")) == "2001:db8::/64"


# --- the config ----------------------------------------------------------------------------------

MODEL = '[[clusters]]\nname = "a"\n[[models]]\nid = "m"\nengine = { kind = "sim" }\n'


def load(tmp_path: Path, text: str):
    path = tmp_path / "first.toml"
    path.write_text(text + MODEL)
    return load_config(path)


def test_the_bound_and_the_proxies_are_read_from_the_config(tmp_path):
    config = load(tmp_path, "")
    assert (config.auth.max_failures_per_min, config.gateway.trusted_proxies) == (60, [])
    config = load(
        tmp_path, '[auth]\nmax_failures_per_min = 0\n[gateway]\ntrusted_proxies = ["10.0.0.0/8", "::1"]\n'
    )
    assert (config.auth.max_failures_per_min, config.gateway.trusted_proxies) == (0, ["10.0.0.0/8", "::1"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("[auth]\nmax_failures_per_min = -1\n", "Expected `int` >= 0 - at `$.auth.max_failures_per_min`"),
        (
            '[gateway]\ntrusted_proxies = ["10.0.0.1", "proxy.example"]\n',
            "$.gateway.trusted_proxies[1]: 'proxy.example' is not an IP address or network",
        ),
    ],
)
def test_a_bad_bound_or_proxy_is_refused_naming_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(info.value).endswith(message)
