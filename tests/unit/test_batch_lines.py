"""Batch mode's pure parts: the line checker (what goes to the error file, and why), the output
lines, the subjects, the wire messages, the [batch] config, and the batch service's NATS user."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from services.batch import lines
from shared import batchstore, errors, natsauth, schema
from shared import config as cfg
from shared.answer import Completion
from shared.subjects import Subjects


def raw(**fields) -> bytes:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}
    line["body"] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    line.update(fields)
    return orjson.dumps(line)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"not json", "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        (raw(custom_id=""), "invalid_custom_id"),
        (raw(custom_id=7), "invalid_request"),
        (raw(method="GET"), "invalid_method"),
        (raw(url="/v1/embeddings"), "invalid_url"),
        (raw(body={"model": "m"}), "invalid_body"),
        (
            raw(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}),
            "invalid_body",
        ),
        (raw(body={"model": "m", "messages": [], "n": 2}), "invalid_body"),
    ],
)
def test_a_bad_line_is_refused_with_its_reason(data, code):
    with pytest.raises(lines.LineError) as refused:
        lines.Checker("/v1/chat/completions").check(3, data)
    assert refused.value.code == code
    assert "line 3" in refused.value.message


def test_a_custom_id_seen_before_is_a_duplicate_and_a_good_line_keeps_its_body():
    checker = lines.Checker("/v1/chat/completions")
    first = checker.check(1, raw(custom_id="x"))
    assert (first.line, first.custom_id, first.model, first.endpoint) == (1, "x", "m", "chat")
    assert orjson.loads(first.body)["messages"][0]["content"] == "hi"
    with pytest.raises(lines.LineError) as dup:
        checker.check(2, raw(custom_id="x"))
    assert dup.value.code == "duplicate_custom_id" and dup.value.custom_id == "x"


def test_firsts_model_overrides_the_lines():
    assert lines.Checker("/v1/chat/completions", model="pinned").check(1, raw()).model == "pinned"


def test_output_and_error_lines_have_openais_shape():
    line = schema.BatchLine(4, "c4", "m", "chat", b"{}")
    ok = orjson.loads(lines.answered(line, "r1", Completion(texts={0: "hello"}, finish_reasons={0: "stop"})))
    assert ok["custom_id"] == "c4" and ok["error"] is None and ok["id"] == "batch_req_r1"
    assert ok["response"]["status_code"] == 200
    assert ok["response"]["body"]["choices"][0]["message"]["content"] == "hello"
    failed = orjson.loads(lines.refused(line, "r2", errors.ModelNotFound("no such model")))
    assert failed["response"]["status_code"] == 404
    assert failed["response"]["body"]["error"]["code"] == "model_not_found"
    invalid = orjson.loads(lines.invalid(9, lines.LineError("invalid_url", "line 9: wrong", "c9")))
    assert invalid["response"] is None and invalid["error"] == {
        "code": "invalid_url",
        "message": "line 9: wrong",
        "line": 9,
    }


def test_batch_subjects_and_their_tokens():
    s = Subjects("first")
    assert s.batch_lines("batch_1") == "first.v1.batch.lines.batch_1"
    assert s.batch_result("batch_1", 12) == "first.v1.batch.results.batch_1.12"
    assert s.batch_results("batch_1") == "first.v1.batch.results.batch_1.*"
    assert s.batch_changed == "first.v1.batch.changed"
    with pytest.raises(ValueError):
        s.batch_lines("a.b")


def test_batch_messages_round_trip_and_untrusted_keys_are_refused():
    record = schema.BatchRecord(
        id="batch_1", owner="alice", input_file_id="file-1", endpoint="/v1/embeddings",
        completion_window="24h", created_at=1, expires_at=2, metadata={"k": "v"},
    )  # fmt: skip
    assert schema.batch_record_decoder.decode(schema.encode(record)) == record
    changed = schema.BatchChanged("abc.batch_1")
    assert schema.batch_changed_decoder.decode(schema.encode(changed)) == changed
    with pytest.raises(msgspec.ValidationError):
        schema.batch_changed_decoder.decode(schema.encode(schema.BatchChanged("a.b.>")))
    result = schema.BatchResult(3, True, b'{"x": 1}')
    assert schema.batch_result_decoder.decode(schema.encode(result)) == result


def test_owner_keys_and_windows():
    assert batchstore.batch_key("alice@anl.gov", "batch_1").endswith(".batch_1")
    assert batchstore.owner_key("alice") != batchstore.owner_key("bob")
    assert batchstore.parse_window("24h") == 86_400
    assert batchstore.parse_window("1d") is None and batchstore.parse_window("0h") is None
    assert batchstore.parse_window("\u00b2h") is None  # a digit to str.isdigit, not to int()
    assert batchstore.parse_window("1" * 5000 + "h") is None  # over int()'s 4300 digits


def test_batch_config_defaults_and_errors():
    config = cfg.Config()
    assert (config.batch.max_file_megabytes, config.batch.max_active_batches) == (200, 10)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.batch\.max_in_flight"):
        msgspec.convert({"batch": {"max_in_flight": 0}}, cfg.Config)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"batch": {"max_files": 1}}, cfg.Config)


def test_the_batch_service_user_may_use_its_streams_and_the_request_path_only():
    config = cfg.Config()
    role = next(r for r in natsauth.roles(config) if r.name == "batch")
    s = Subjects("first")
    for subject in (
        s.infer,
        s.batch_lines_all,
        s.batch_results_all,
        "$O.first_files.>",
        "$KV.first_batches.>",
    ):
        assert subject in role.publish
    assert "$JS.API.STREAM.PURGE.FIRST_BATCH_LINES" in role.publish
    assert s.batch_changed in role.subscribe and s.reply_all in role.subscribe
    assert ">" not in role.publish and s.worker_infer_all not in role.publish
    gateway = next(r for r in natsauth.roles(config) if r.name == "gateway")
    assert s.batch_changed in gateway.publish and "$O.first_files.>" in gateway.publish
    assert not any("BATCH_LINES" in p for p in gateway.publish)
