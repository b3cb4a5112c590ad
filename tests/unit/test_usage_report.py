"""``first usage``'s arithmetic: requests are distinct request ids and runs are records, tokens and
outcomes add up per user, model or cluster, rows go by tokens, and the CSV has every field."""

from __future__ import annotations

import csv
import io

import pytest

from services.admin import usage
from shared import schema, usage_stream

ALICE = schema.Identity(user="alice", kind="key", name="Alice", groups=["hpc", "ml"], key_id="k1")


def record(rid: str, **kw) -> schema.UsageRecord:
    fields = {"model": "m", "endpoint": "chat", "worker_id": "w1", "cluster": "a", "outcome": "ok"}
    return schema.UsageRecord(request_id=rid, **{**fields, **kw})


def report(by: str, records: list[schema.UsageRecord]) -> usage.Report:
    rep = usage.Report(by, since=1_700_000_000.0, stream="S")
    for r in records:
        rep.add(r)
    return rep


RECORDS = [
    # r1 ran twice: its first worker stopped before any text, the second answered.
    record("r1", identity=ALICE, outcome="retried", prompt_tokens=10, attempt=0),
    record(
        "r1", identity=ALICE, prompt_tokens=10, completion_tokens=20, attempt=1, worker_id="w2", cluster="b"
    ),
    record("r2", identity=ALICE, outcome="engine_error", prompt_tokens=5, completion_tokens=1),
    record("r3", model="big", prompt_tokens=100, completion_tokens=300),  # no identity: anonymous
    record("r4", model="big", outcome="cancelled", prompt_tokens=7, completion_tokens=2),
]


def test_a_retried_request_is_one_request_and_two_runs():
    rep = report("user", RECORDS)
    alice = rep.groups["alice"].as_dict()
    assert alice["requests"] == 2 and alice["runs"] == 3
    assert (alice["prompt_tokens"], alice["completion_tokens"], alice["total_tokens"]) == (25, 21, 46)
    assert alice["outcomes"] == {"ok": 1, "failed": 1, "cancelled": 0, "retried": 1}


def test_records_without_identity_count_as_anonymous():
    rep = report("user", RECORDS)
    assert set(rep.groups) == {"alice", "anonymous"}
    assert rep.groups["anonymous"].as_dict()["outcomes"] == {
        "ok": 1,
        "failed": 0,
        "cancelled": 1,
        "retried": 0,
    }


def test_rows_go_by_total_tokens_and_the_total_counts_each_request_once():
    rep = report("cluster", RECORDS)
    assert [key for key, _ in rep.rows()] == ["a", "b"]  # a: 25+1+6+400+9 tokens, b: 30
    # r1 ran on both clusters: one request in each, one request in all.
    assert len(rep.groups["a"].request_ids) == 4 and len(rep.groups["b"].request_ids) == 1
    total = rep.total.as_dict()
    assert (total["requests"], total["runs"], total["total_tokens"]) == (4, 5, 455)


def test_by_model_groups_by_model():
    rep = report("model", RECORDS).as_json()
    assert [(row["model"], row["requests"], row["total_tokens"]) for row in rep["rows"]] == [
        ("big", 2, 409),
        ("m", 2, 46),
    ]


@pytest.mark.parametrize("outcome", ["nats_error", "engine_timeout", "invalid_request", "whatever_new"])
def test_every_error_outcome_counts_as_failed(outcome):
    assert usage.outcome_class(outcome) == "failed"


def test_the_table_has_a_row_per_group_sorted_by_tokens_and_a_total():
    lines = report("user", RECORDS).table().splitlines()
    assert lines[0].startswith("5 usage records since ") and lines[0].endswith("in stream S, by user")
    rows = [line.split() for line in lines[2:]]
    assert rows[0] == ["user", "requests", "runs", "prompt", "completion", "total", *usage.OUTCOMES]
    assert rows[1] == ["anonymous", "2", "2", "107", "302", "409", "1", "0", "1", "0"]
    assert rows[2] == ["alice", "2", "3", "25", "21", "46", "1", "1", "0", "1"]
    assert rows[4] == ["total", "4", "5", "132", "323", "455", "2", "1", "1", "1"]


def test_an_empty_window_says_so_in_one_line():
    assert (
        report("user", []).table()
        == "0 usage records since 2023-11-14T22:13:20.000+00:00 in stream S, by user"
    )


def test_a_csv_line_holds_every_field_of_the_record_and_its_identity():
    rec = record("r1", identity=ALICE, prompt_tokens=3, completion_tokens=4, ttft_s=0.25, duration_s=1.5,
                 attempt=1, created=1_700_000_000.0, sent=1_700_000_001.5)  # fmt: skip
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(usage.CSV_FIELDS)
    writer.writerow(usage.csv_row(usage_stream.Stored(7, 1_700_000_002.0, b""), rec))
    writer.writerow(usage.csv_row(usage_stream.Stored(8, 1_700_000_003.0, b""), record("r2")))
    first, anon = csv.DictReader(io.StringIO(out.getvalue()))
    assert first == {
        "time": "2023-11-14T22:13:22.000+00:00", "seq": "7", "request_id": "r1", "attempt": "1",
        "model": "m", "endpoint": "chat", "cluster": "a", "worker_id": "w1", "outcome": "ok",
        "prompt_tokens": "3", "completion_tokens": "4", "ttft_s": "0.25", "duration_s": "1.5",
        "created": "2023-11-14T22:13:20.000+00:00", "sent": "2023-11-14T22:13:21.500+00:00",
        "user": "alice", "identity_kind": "key", "identity_name": "Alice", "username": "", "idp": "",
        "groups": "hpc;ml", "key_id": "k1",
    }  # fmt: skip
    assert (anon["user"], anon["identity_kind"], anon["groups"], anon["ttft_s"]) == (
        "anonymous", "anonymous", "", ""
    )  # fmt: skip


@pytest.mark.parametrize(("text", "ago"), [("7d", 7 * 86_400), ("12h", 43_200), ("30m", 1800), ("90s", 90),
                                           ("2w", 14 * 86_400), ("1.5d", 1.5 * 86_400)])  # fmt: skip
def test_since_takes_a_duration_back_from_now(text, ago):
    assert usage.parse_since(text, now=1_000_000_000.0) == 1_000_000_000.0 - ago


def test_since_takes_a_date_in_utc_or_a_time_with_its_offset():
    assert usage.parse_since("2023-11-14", now=0) == 1_699_920_000.0
    assert usage.parse_since("2023-11-14T01:00:00+01:00", now=0) == 1_699_920_000.0


@pytest.mark.parametrize("text", ["7", "d7", "yesterday", "-3d", ""])
def test_a_since_that_is_neither_fails_with_an_example(text):
    with pytest.raises(usage.Failed, match="give a duration"):
        usage.parse_since(text, now=0)


def test_by_as_csv_is_a_header_and_one_row_per_group_by_tokens():
    rows = report("user", RECORDS).csv_rows()
    assert rows == [
        ["user", "requests", "runs", "prompt_tokens", "completion_tokens", "total_tokens", *usage.OUTCOMES],
        ["anonymous", 2, 2, 107, 302, 409, 1, 0, 1, 0],
        ["alice", 2, 3, 25, 21, 46, 1, 1, 0, 1],
    ]


@pytest.mark.parametrize("text", ['=HYPERLINK("http://x")', "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx"])
def test_a_cell_a_spreadsheet_would_run_as_a_formula_gets_a_leading_apostrophe(text):
    assert usage.safe_cell(text) == "'" + text


@pytest.mark.parametrize("value", ["alice", "a=b", "", 3, -3, 0.25])
def test_other_cells_and_numbers_are_left_alone(value):
    assert usage.safe_cell(value) == value


def test_names_users_chose_are_guarded_in_both_csvs():
    """An API key's name is whatever ``first keys create`` was given."""
    evil = schema.Identity(user="=cmd|' /C calc'!A0", kind="key", name="@me", groups=["-g"])
    rec = record("r1", identity=evil, model="+m")
    row = dict(
        zip(usage.CSV_FIELDS, usage.csv_row(usage_stream.Stored(1, 1_700_000_000.0, b""), rec), strict=True)
    )
    assert (row["user"], row["identity_name"], row["groups"], row["model"]) == (
        "'=cmd|' /C calc'!A0", "'@me", "'-g", "'+m"
    )  # fmt: skip
    assert row["prompt_tokens"] == 0 and row["request_id"] == "r1"
    assert report("user", [rec]).csv_rows()[1][0] == "'=cmd|' /C calc'!A0"
