"""``nats.jetstream_replicas``: 1 unless set, 1 to 5; anything else fails at load naming the field."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, load_config

BASE = """
[[clusters]]
name = "a"

[[models]]
id = "m"
engine = {kind = "sim"}
"""


def test_one_copy_unless_the_config_asks_for_more(tmp_path):
    path = tmp_path / "first.toml"
    path.write_text(BASE)
    assert load_config(path).nats.jetstream_replicas == 1
    path.write_text("[nats]\njetstream_replicas = 3\n" + BASE)
    assert load_config(path).nats.jetstream_replicas == 3


@pytest.mark.parametrize(
    ("value", "why"), [("0", ">= 1"), ("6", "<= 5"), ('"3"', "Expected `int`"), ("2.5", "Expected `int`")]
)
def test_a_bad_count_names_the_field(tmp_path, value, why):
    path = tmp_path / "first.toml"
    path.write_text(f"[nats]\njetstream_replicas = {value}\n" + BASE)
    with pytest.raises(ConfigError, match=r"\$\.nats\.jetstream_replicas") as err:
        load_config(path)
    assert why in str(err.value) and str(path) in str(err.value)
