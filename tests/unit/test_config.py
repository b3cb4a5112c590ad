"""The config file: the shipped ones load, and every mistake fails at start naming the field."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from shared import config as cfg
from shared.config import ConfigError, load_config

COMPOSE = Path(__file__).resolve().parents[2] / "compose"

BASE = """
[[clusters]]
name = "polaris"

[[models]]
id = "m"
{model_extra}
[models.engine]
kind = "{kind}"
[models.scaling]
{scaling}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "first.toml"
    path.write_text(text)
    return path


def config_text(*, model_extra: str = "", kind: str = "sim", scaling: str = "", head: str = "") -> str:
    return head + BASE.format(model_extra=model_extra, kind=kind, scaling=scaling)


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


@pytest.mark.parametrize("name", ["first.local.toml", "first.sim.toml"])
def test_shipped_configs_load(name):
    config = load_config(COMPOSE / name)
    assert config.models and config.clusters
    for model in config.models:
        assert config.clusters_for(model)


def test_sim_config_has_sim_engines_with_its_own_settings():
    config = load_config(COMPOSE / "first.sim.toml")
    assert all(isinstance(m.engine, cfg.SimEngine) for m in config.models)
    assert config.router.queue_timeout_s == 30


def test_minimal_config_gets_defaults(tmp_path):
    config = load_config(write(tmp_path, config_text()))
    model = config.model("m")
    assert model is not None and isinstance(model.engine, cfg.SimEngine)
    assert model.capacity == 4
    assert config.clusters_for(model) == ["polaris"]
    assert config.nats.subject_prefix == "first"
    assert config.model("other") is None


def test_typo_in_a_section_name_is_refused_naming_it(tmp_path):
    message = load_error(tmp_path, config_text(head="[gatway]\nport = 1\n"))
    assert "gatway" in message
    assert str(tmp_path / "first.toml") in message


def test_typo_in_a_key_is_refused_naming_its_path(tmp_path):
    message = load_error(tmp_path, config_text(head="[gateway]\nprot = 8000\n"))
    assert "prot" in message and "$.gateway" in message


def test_zero_capacity_is_refused_naming_the_field(tmp_path):
    message = load_error(tmp_path, config_text(model_extra="capacity = 0"))
    assert "$.models[0].capacity" in message


def test_unknown_engine_kind_is_refused(tmp_path):
    message = load_error(tmp_path, config_text(kind="tensorrt"))
    assert "tensorrt" in message and "$.models[0].engine" in message


def test_engine_key_of_another_kind_is_refused(tmp_path):
    text = config_text().replace('kind = "sim"', 'kind = "sim"\nn_ctx = 4096')
    message = load_error(tmp_path, text)
    assert "n_ctx" in message


def test_model_on_an_unknown_cluster_is_refused_naming_the_field(tmp_path):
    message = load_error(tmp_path, config_text(model_extra='clusters = ["aurora"]'))
    assert "$.models[0].clusters" in message and "aurora" in message


def test_min_hot_above_max_workers_is_refused(tmp_path):
    message = load_error(tmp_path, config_text(scaling="min_hot = 3\nmax_workers = 2"))
    assert "$.models[0].scaling" in message and "min_hot" in message


def test_model_with_no_cluster_at_all_is_refused(tmp_path):
    text = '[[models]]\nid = "m"\n[models.engine]\nkind = "sim"\n'
    assert "$.models[0]" in load_error(tmp_path, text)


def test_duplicate_cluster_names_and_model_ids_are_refused(tmp_path):
    dup_cluster = config_text(head='[[clusters]]\nname = "polaris"\n')
    assert "$.clusters" in load_error(tmp_path, dup_cluster)
    dup_model = config_text() + '[[models]]\nid = "m"\n[models.engine]\nkind = "sim"\n'
    assert "$.models" in load_error(tmp_path, dup_model)


def test_cluster_name_that_cannot_be_a_subject_token_is_refused(tmp_path):
    text = config_text().replace('name = "polaris"', 'name = "pol.aris"')
    assert "$.clusters[0].name" in load_error(tmp_path, text)


def test_dotted_subject_prefix_is_accepted_but_wildcards_are_not(tmp_path):
    ok = load_config(write(tmp_path, config_text(head='[nats]\nsubject_prefix = "site.first"\n')))
    assert ok.nats.subject_prefix == "site.first"
    message = load_error(tmp_path, config_text(head='[nats]\nsubject_prefix = "site.*"\n'))
    assert "$.nats.subject_prefix" in message


@pytest.mark.parametrize("prefix", ["first.", ".first", "a..b"])
def test_subject_prefix_with_an_empty_part_is_refused_at_load(tmp_path, prefix):
    message = load_error(tmp_path, config_text(head=f'[nats]\nsubject_prefix = "{prefix}"\n'))
    assert "$.nats.subject_prefix" in message


def test_invalid_toml_says_so(tmp_path):
    message = load_error(tmp_path, "[gateway\nport = 1\n")
    assert "not valid TOML" in message


def test_missing_file_says_it_cannot_be_read(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_aliases_name_their_model_and_clash_with_no_other_name():
    base = {"clusters": [{"name": "c"}]}
    sim = {"kind": "sim"}
    config = msgspec.convert(
        {**base, "models": [{"id": "m", "engine": sim, "aliases": ["old-m"]}, {"id": "n", "engine": sim}]},
        cfg.Config,
    )
    cfg.validate(config)
    assert config.model("old-m").id == "m" and config.model("n").id == "n" and config.model("x") is None
    assert set(config.model_names()) == {"m", "old-m", "n"}
    clash = msgspec.convert(
        {**base, "models": [{"id": "m", "engine": sim}, {"id": "n", "engine": sim, "aliases": ["m"]}]},
        cfg.Config,
    )
    with pytest.raises(ValueError, match="ids and aliases must be unique"):
        cfg.validate(clash)
