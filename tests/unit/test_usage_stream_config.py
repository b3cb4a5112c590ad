"""The usage stream's name, subject, limits and dedupe id follow the config; bad [usage] values fail
at load, naming the field."""

from __future__ import annotations

import msgspec
import pytest
from nats.js import api

from shared import config as cfg
from shared import usage_stream
from shared.config import ConfigError, load_config
from shared.subjects import Subjects


def config(prefix: str = "first", **usage) -> cfg.Config:
    raw = {"nats": {"subject_prefix": prefix}, "usage": usage, "clusters": [{"name": "a"}]}
    raw["models"] = [{"id": "m", "engine": {"kind": "sim"}}]
    return msgspec.convert(raw, cfg.Config)


@pytest.mark.parametrize(
    ("prefix", "stream", "name"),
    [("first", "", "FIRST_USAGE"), ("anl.first", "", "ANL_FIRST_USAGE"), ("first", "ACCT", "ACCT")],
)
def test_the_stream_is_named_after_the_prefix_unless_the_config_names_it(prefix, stream, name):
    assert usage_stream.stream_name(config(prefix, stream=stream)) == name


def test_the_stream_captures_the_usage_subject_on_file_for_the_retention_period():
    got = usage_stream.stream_config(config("anl.first", retention_days=30))
    assert got.subjects == [Subjects("anl.first").usage] == ["anl.first.v1.usage"]
    assert got.storage == api.StorageType.FILE
    assert got.retention == api.RetentionPolicy.LIMITS and got.discard == api.DiscardPolicy.OLD
    assert got.max_age == 30 * 86_400
    assert got.duplicate_window == usage_stream.DUPLICATE_WINDOW_S == 120


def test_a_retention_shorter_than_the_duplicate_window_shortens_the_window():
    """JetStream refuses a duplicate window longer than max_age."""
    got = usage_stream.stream_config(config(retention_days=60 / 86_400))
    assert got.max_age == pytest.approx(60) and got.duplicate_window == pytest.approx(60)


def test_a_runs_record_is_deduplicated_by_request_and_attempt():
    assert usage_stream.MSG_ID == "Nats-Msg-Id"
    assert usage_stream.msg_id("4a9ac049", 2) == "4a9ac049:2"


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ('stream = "first.usage"', "$.usage.stream"),  # a dot: not a stream name
        ('stream = "a b"', "$.usage.stream"),
        ("retention_days = 0", "$.usage.retention_days"),
        ("retention_days = 100000", "$.usage.retention_days"),  # beyond JetStream's nanoseconds
        ("days = 3", "days"),
    ],
)
def test_bad_usage_settings_fail_at_load_naming_the_field(tmp_path, section, field):
    path = tmp_path / "first.toml"
    path.write_text(
        f'[usage]\n{section}\n[[clusters]]\nname = "a"\n[[models]]\nid = "m"\nengine = {{ kind = "sim" }}\n'
    )
    with pytest.raises(ConfigError, match=field.replace("$", r"\$").replace(".", r"\.")):
        load_config(path)


def test_replicas_are_one_unless_the_config_names_them():
    assert usage_stream.stream_config(config()).num_replicas == 1
    assert usage_stream.stream_config(config(replicas=3)).num_replicas == 3
    with pytest.raises(msgspec.ValidationError, match="replicas"):
        config(replicas=7)
