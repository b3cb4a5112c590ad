"""``auth.methods`` in the config file: "none" stands alone, at least one method is named, an unknown
one is refused naming the field, and keys and Globus together are accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, load_config

MODEL = '[[clusters]]\nname = "a"\n[[models]]\nid = "m"\nengine = { kind = "sim" }\n'


def load(tmp_path: Path, methods: str):
    path = tmp_path / "first.toml"
    path.write_text(f"[auth]\nmethods = {methods}\n{MODEL}")
    return load_config(path)


def load_error(tmp_path: Path, methods: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, methods)
    return str(info.value)


@pytest.mark.parametrize("methods", ['["none", "keys"]', '["globus", "none"]'])
def test_none_combined_with_another_method_is_refused_naming_the_field(tmp_path, methods):
    message = load_error(tmp_path, methods)
    assert message.endswith('$.auth.methods: "none" (an open deployment) cannot be combined with others')
    assert message.startswith(str(tmp_path / "first.toml"))


def test_no_method_at_all_is_refused_naming_the_field(tmp_path):
    message = load_error(tmp_path, "[]")
    assert message.endswith('$.auth.methods: name at least one of "none", "keys", "globus"')


def test_an_unknown_method_is_refused_naming_the_field(tmp_path):
    message = load_error(tmp_path, '["keys", "ldap"]')
    assert "ldap" in message and "$.auth.methods[1]" in message


def test_a_method_named_twice_is_refused_naming_the_field(tmp_path):
    message = load_error(tmp_path, '["keys", "globus", "keys"]')
    assert message.endswith("$.auth.methods: each method once, not ['keys', 'globus', 'keys']")


def test_keys_and_globus_together_are_accepted(tmp_path):
    assert load(tmp_path, '["keys", "globus"]').auth.methods == ["keys", "globus"]


def test_without_an_auth_section_the_deployment_is_open(tmp_path):
    path = tmp_path / "first.toml"
    path.write_text(MODEL)
    assert load_config(path).auth.methods == ["none"]
