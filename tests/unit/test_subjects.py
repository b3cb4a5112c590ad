"""Subject names: every subject sits under ``<prefix>.v1.``, and ids that travel in subjects are checked."""

from __future__ import annotations

import pytest

from shared.subjects import PROTOCOL, Subjects, check_token


def all_subjects(s: Subjects) -> list[str]:
    return [
        s.infer,
        s.worker_infer("w-1"),
        s.cancel,
        s.heartbeat("polaris", "w-1"),
        s.heartbeat_all,
        s.demand,
        s.usage,
        s.limits,
        s.event("node", "running", "scaler"),
        s.status,
        s.reply_stream("c1", "r1"),
        s.reply_stream_all("c1"),
        s.infer_user("alice"),
        s.infer_users,
        s.cancel_user("alice"),
        s.cancel_users,
        s.worker_cancel_user("w-1", "alice"),
        s.worker_cancel_users("w-1"),
        s.worker_cancel_user_all("alice"),
        s.worker_cancel_users_all,
        s.worker_infer_all,
        s.worker_runs_all,
        s.worker_control("w-1"),
        s.worker_control_all,
        s.router_all,
        s.router_heartbeat_all,
        s.reply_all,
    ]


@pytest.mark.parametrize("prefix", ["first", "t123", "a.b"])
def test_every_subject_is_under_prefix_and_protocol_version(prefix):
    subjects = all_subjects(Subjects(prefix))
    assert all(s.startswith(f"{prefix}.{PROTOCOL}.") for s in subjects)
    assert len(set(subjects)) == len(subjects), "two roles share one subject"


def test_default_prefix_is_first():
    assert Subjects().infer == "first.v1.infer"


def test_ids_appear_as_single_tokens_in_subjects():
    s = Subjects("first")
    assert s.worker_infer("w_9") == "first.v1.worker.w_9.infer"
    assert s.heartbeat("sophia", "w-2") == "first.v1.heartbeat.sophia.w-2"
    assert s.reply_stream("client", "req") == "first.v1.reply.client.req"


@pytest.mark.parametrize("good", ["abc", "A-b_9", "0", "550e8400-e29b-41d4"])
def test_check_token_accepts_letters_digits_underscore_dash(good):
    assert check_token(good, "id") == good


@pytest.mark.parametrize("bad", ["", "a.b", "*", ">", "a*", "a>", "a b", " a", "a\tb", "é"])
def test_check_token_refuses_dots_wildcards_spaces_and_empty(bad):
    with pytest.raises(ValueError, match="worker id"):
        check_token(bad, "worker id")


def test_check_token_refuses_trailing_newline():
    with pytest.raises(ValueError):
        check_token("abc\n", "request id")


@pytest.mark.parametrize("prefix", ["", "a..b", ".a", "a.", "a.*", "a.>", "a b", "a.b c"])
def test_prefix_parts_are_each_checked(prefix):
    with pytest.raises(ValueError):
        Subjects(prefix)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.worker_infer("w.1"),
        lambda s: s.heartbeat("a.b", "w"),
        lambda s: s.heartbeat("c", "*"),
        lambda s: s.reply_stream("c", "r.1"),
        lambda s: s.reply_stream(">", "r"),
        lambda s: s.reply_stream_all("c 1"),
        lambda s: s.worker_control("w.>"),
    ],
)
def test_builders_refuse_ids_that_would_change_the_subject_shape(call):
    with pytest.raises(ValueError):
        call(Subjects("first"))


def _matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, ``>`` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def test_reply_stream_all_matches_every_reply_stream_of_that_client_only():
    s = Subjects("a.b")
    pattern = s.reply_stream_all("c1")
    assert _matches(pattern, s.reply_stream("c1", "r1"))
    assert _matches(pattern, s.reply_stream("c1", "another-request"))
    assert not _matches(pattern, s.reply_stream("c2", "r1"))
    assert not _matches(pattern, Subjects("a").reply_stream("c1", "r1"))


def test_heartbeat_all_matches_every_workers_heartbeat_and_nothing_else():
    s = Subjects("first")
    assert _matches(s.heartbeat_all, s.heartbeat("polaris", "w1"))
    assert _matches(s.heartbeat_all, s.heartbeat("sophia", "w2"))
    assert not _matches(s.heartbeat_all, s.demand)
    assert not _matches(s.heartbeat_all, s.infer)


def test_events_carry_kind_name_and_source_so_roles_can_be_held_to_their_own():
    s = Subjects("first")
    assert s.event("node", "running", "scaler") == "first.v1.events.node.running.scaler"
    assert s.events_of("worker", "polaris-n0") == "first.v1.events.worker.*.polaris-n0"
    assert s.node_events == "first.v1.events.node.*.*"
    assert s.events_all == "first.v1.events.>"
    with pytest.raises(ValueError, match="event source"):
        s.event("node", "running", "a.b")


def test_a_workers_control_subject_is_its_own_and_the_scalers_pattern_covers_only_those():
    s = Subjects("first")
    assert s.worker_control("a-n0") == "first.v1.worker.a-n0.control"
    assert _matches(s.worker_control_all, s.worker_control("a-n0"))
    for other in (s.worker_infer("a-n0"), s.worker_cancel("a-n0"), s.worker_runs("a-n0")):
        assert not _matches(s.worker_control_all, other)
