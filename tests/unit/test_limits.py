"""Request and token limits without NATS: the sliding window, the ledger's decisions under a fake
clock, which limits apply to an identity, and the x-ratelimit-* headers."""

from __future__ import annotations

import random

import msgspec
import pytest

from services.gateway.limits import duration, rate_headers
from shared import config as cfg
from shared import schema
from shared.access_config import LimitSet
from shared.limits import UNLIMITED, Limiter, limits_for
from shared.limits_ledger import Ledger
from shared.limits_window import Window
from shared.subjects import Subjects

EPS = 1e-6  # waits are a hair longer than the slot boundary they name


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def only(**fields) -> LimitSet:
    return msgspec.structs.replace(UNLIMITED, **fields)


# --- the window ----------------------------------------------------------------------------------


def test_a_count_leaves_the_window_between_span_and_span_plus_one_slot():
    w = Window(1.0, 10)
    w.add("k", 3, 100.05)
    assert w.count("k", 100.05 + 0.999) == 3  # still within the second
    assert w.count("k", 101.05) == 3  # its slot [100.0, 100.1) leaves at 101.1
    assert w.count("k", 101.1) == 0


def test_never_more_than_the_limit_in_any_stretch_of_the_span():
    """Allow iff count < limit, against an exact sliding log of what was allowed."""
    rng = random.Random(7)
    w, limit, allowed, now = Window(1.0, 10), 5, [], 0.0
    for _ in range(5000):
        now += rng.expovariate(20.0)
        if w.count("u", now) < limit:
            w.add("u", 1, now)
            allowed.append(now)
    assert len(allowed) > 1000
    for i in range(len(allowed) - limit):  # any limit+1 admitted requests span more than a second
        assert allowed[i + limit] - allowed[i] > 1.0


def test_room_in_says_when_the_count_falls_below_the_limit():
    w = Window(60.0, 30)  # 2 s slots
    w.add("k", 40, 10.0)  # slot [10, 12): leaves at 72
    w.add("k", 30, 30.5)  # slot [30, 32): leaves at 92
    assert w.room_in("k", 31.0, 100) == 0.0
    assert w.room_in("k", 31.0, 50) == pytest.approx(72.0 - 31.0)  # 30 left once the 40 leave
    assert w.room_in("k", 31.0, 20) == pytest.approx(92.0 - 31.0)
    assert w.count("k", 72.0) == 30


def test_reset_in_is_when_everything_counted_has_left():
    w = Window(1.0, 10)
    assert w.reset_in("k", 5.0) == 0.0
    w.add("k", 1, 5.0)
    w.add("k", 1, 5.55)  # slot [5.5, 5.6): leaves at 6.6
    assert w.reset_in("k", 5.55) == pytest.approx(1.05)
    assert w.reset_in("k", 6.6) == 0.0


def test_a_key_idle_for_longer_than_the_window_is_counted_from_zero():
    w = Window(1.0, 10)
    w.add("k", 5, 1.0)
    w.add("k", 1, 50.0)  # many windows later: the old slots are gone, not wrapped around
    assert w.count("k", 50.0) == 1


def test_sweep_forgets_idle_keys_only():
    w = Window(1.0, 10)
    w.add("idle", 1, 1.0)
    w.add("busy", 1, 1.0)
    w.add("busy", 1, 2.0)
    assert w.sweep(2.15) == 1 and len(w) == 1
    assert w.count("busy", 2.15) == 1


def test_input_from_the_network_adds_no_keys_beyond_the_bound():
    w = Window(1.0, 10, max_keys=2)
    assert w.add("a", 1, 0.0, grow=False) and w.add("b", 1, 0.0, grow=False)
    assert not w.add("c", 1, 0.0, grow=False) and w.count("c", 0.0) == 0
    assert w.add("a", 1, 0.0, grow=False)  # a key already there still counts
    assert w.add("d", 1, 0.0)  # what this gateway admits always counts


# --- the ledger ----------------------------------------------------------------------------------


def test_a_user_over_requests_per_s_is_refused_until_the_second_has_passed():
    clock = Clock(100.0)
    ledger = Ledger(clock)
    limits = only(requests_per_s=3)
    assert [ledger.admit("alice", limits, "m").refusal for _ in range(3)] == ["", "", ""]
    refused = ledger.admit("alice", limits, "m")
    assert "3 requests/s per user" in refused.refusal
    assert 1.0 <= refused.retry_after_s <= 1.1 + EPS
    assert refused.standing.requests_left == 0
    assert ledger.admit("bob", limits, "m").refusal == ""  # another user is unaffected
    clock.now += refused.retry_after_s
    assert ledger.admit("alice", limits, "m").refusal == ""


def test_refused_requests_do_not_count():
    clock = Clock()
    ledger = Ledger(clock)
    limits = only(requests_per_s=1)
    ledger.admit("alice", limits)  # leaves the window 1.1 s later
    clock.now += 0.5
    for _ in range(10):
        assert ledger.admit("alice", limits).refusal
    clock.now += 0.6
    assert ledger.admit("alice", limits).refusal == ""


def test_model_requests_per_s_counts_each_model_apart():
    ledger = Ledger(Clock())
    limits = only(model_requests_per_s=1)
    assert ledger.admit("alice", limits, "a").refusal == ""
    assert "for the model 'a'" in ledger.admit("alice", limits, "a").refusal
    assert ledger.admit("alice", limits, "b").refusal == ""


def test_tokens_per_min_allows_a_request_while_the_count_is_below_the_limit():
    """FIRST's rule: a request is not sized in advance, so one may take the count past the limit."""
    clock = Clock()
    ledger = Ledger(clock)
    limits = only(model_tokens_per_min=100)
    ledger.spent("alice", "m", 99)
    assert ledger.admit("alice", limits, "m").refusal == ""
    ledger.spent("alice", "m", 500)  # that request was large
    refused = ledger.admit("alice", limits, "m")
    assert "100 tokens/min per user for the model 'm'" in refused.refusal
    assert 60.0 <= refused.retry_after_s <= 62.0 + EPS
    assert ledger.admit("alice", limits, "other").refusal == ""  # per model
    clock.now += refused.retry_after_s
    assert ledger.admit("alice", limits, "m").refusal == ""


def test_tokens_per_min_over_all_models_adds_them_up():
    ledger = Ledger(Clock())
    limits = only(tokens_per_min=100)
    ledger.spent("alice", "a", 60)
    ledger.spent("alice", "b", 40)
    assert "all models together" in ledger.admit("alice", limits, "c").refusal


def test_a_models_own_tokens_per_min_counts_every_user_together():
    ledger = Ledger(Clock())
    ledger.spent("alice", "m", 600)
    ledger.spent(None, "m", 400)  # anonymous callers' tokens load the model too
    refused = ledger.admit("bob", UNLIMITED, "m", model_tpm=1000)
    assert "the model 'm' serves 1000 tokens/min to all users together" in refused.refusal
    assert ledger.admit("bob", UNLIMITED, "other", model_tpm=1000).refusal == ""


def test_the_refusal_names_the_limit_that_holds_the_request_longest():
    ledger = Ledger(Clock())
    limits = only(requests_per_s=1, model_tokens_per_min=10)
    ledger.spent("alice", "m", 50)
    ledger.admit("alice", limits, "m")
    refused = ledger.admit("alice", limits, "m")
    assert "tokens/min" in refused.refusal and refused.retry_after_s > 59


def test_requests_admitted_elsewhere_count_here():
    ledger = Ledger(Clock())
    ledger.admitted_elsewhere("alice", "m", 2)
    assert ledger.admit("alice", only(model_requests_per_s=2), "m").refusal
    assert ledger.take_unshared() == {}  # what others admitted is not sent back out


def test_what_this_gateway_admits_is_kept_for_the_others_once():
    ledger = Ledger(Clock())
    ledger.admit("alice", UNLIMITED, "m")
    ledger.admit("alice", UNLIMITED, "m")
    ledger.admit("alice", UNLIMITED)  # not a model of the config
    ledger.spent_here("alice", "m", 30)
    ledger.spent_here("alice", "m", 12)
    ledger.spent_here("bob", "m", 5)  # an answer whose request was counted before the last share
    assert ledger.take_unshared() == {("alice", "m"): [2, 42], ("alice", ""): [1, 0], ("bob", "m"): [0, 5]}
    assert ledger.take_unshared() == {}
    assert ledger.usage("alice", ["m"])["tokens_per_min"] == 42  # counted here too


def test_tokens_spent_elsewhere_count_here_and_are_not_sent_back_out():
    ledger = Ledger(Clock())
    ledger.spent("alice", "m", 300)  # as the Limiter counts another gateway's AdmittedRequests
    assert ledger.admit("alice", only(model_tokens_per_min=300), "m").refusal
    assert ledger.take_unshared() == {}


def test_the_standing_is_the_tightest_request_and_token_limit():
    ledger = Ledger(Clock())
    limits = LimitSet(
        requests_per_s=10, model_requests_per_s=2, tokens_per_min=1000, model_tokens_per_min=300
    )
    ledger.spent("alice", "m", 250)
    s = ledger.admit("alice", limits, "m", model_tpm=100_000).standing
    assert (s.request_limit, s.requests_left) == (2, 1)  # this request counted
    assert (s.token_limit, s.tokens_left) == (300, 50)
    assert 60 <= s.tokens_reset_s <= 62 + EPS and 1.0 <= s.requests_reset_s <= 1.1 + EPS


def test_no_limit_that_applies_means_no_standing():
    s = Ledger(Clock()).admit("alice", UNLIMITED, "m").standing
    assert s.request_limit == 0 and s.token_limit == 0


def test_idle_users_are_forgotten():
    clock = Clock()
    ledger = Ledger(clock)
    ledger.admit("alice", UNLIMITED, "m")
    ledger.spent("alice", "m", 10)
    clock.now += 63
    assert ledger.sweep() == 5
    assert ledger.usage("alice", ["m"]) == {"requests_per_s": 0, "tokens_per_min": 0, "models": {}}


def test_the_limiter_lets_the_anonymous_caller_through_uncounted_even_where_a_model_is_limited():
    config = msgspec.convert(
        {
            "clusters": [{"name": "c"}],
            "models": [{"id": "m", "engine": {"kind": "sim"}, "tokens_per_min": 1}],
        },
        cfg.Config,
    )
    limiter = Limiter(None, Subjects("t"), config)  # admit needs no NATS
    limiter.ledger.spent(None, "m", 100)
    assert limiter.admit(schema.ANONYMOUS, "m") is None
    assert limiter.admit(schema.Identity(user="alice", kind="key"), "m").refusal


# --- which limits apply ---------------------------------------------------------------------------


def config_with(**limits) -> cfg.Config:
    return msgspec.convert({"limits": limits}, cfg.Config)


def test_the_anonymous_caller_of_an_open_deployment_has_no_limits():
    assert limits_for(schema.ANONYMOUS, config_with()) == UNLIMITED


def test_a_user_without_a_group_override_gets_the_deployments_limits():
    config = config_with(user={"requests_per_s": 5}, groups={"big": {"requests_per_s": 50}})
    alice = schema.Identity(user="alice", kind="key", groups=["other"])
    assert limits_for(alice, config).requests_per_s == 5


def test_the_most_generous_of_a_users_groups_applies_and_zero_is_the_most_generous():
    config = config_with(
        groups={
            "big": {"requests_per_s": 50, "model_tokens_per_min": 1000},
            "bigger": {"requests_per_s": 20, "model_tokens_per_min": 0},
        }
    )
    alice = schema.Identity(user="alice", kind="globus", groups=["big", "bigger"])
    limits = limits_for(alice, config)
    assert limits.requests_per_s == 50 and limits.model_tokens_per_min == 0


@pytest.mark.parametrize("field", ["requests_per_s", "model_requests_per_s"])
def test_a_request_rate_below_one_a_second_is_refused_naming_the_field(field):
    with pytest.raises(msgspec.ValidationError, match=f"{field} must be 0"):
        config_with(groups={"g": {field: 0.5}})


# --- headers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.0004, "0s"), (0.95, "950ms"), (1.0, "1s"), (1.5, "1.5s"), (360, "6m0s"),
     (61.25, "1m1.25s"), (3723, "1h2m3s")],
)  # fmt: skip
def test_durations_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text


def test_headers_name_only_the_kinds_of_limit_that_apply():
    s = Ledger(Clock()).admit("alice", only(model_tokens_per_min=500), "m").standing
    assert dict(rate_headers(s)) == {
        "x-ratelimit-limit-tokens": "500",
        "x-ratelimit-remaining-tokens": "500",
        "x-ratelimit-reset-tokens": "0s",
    }
