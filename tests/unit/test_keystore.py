"""API keys without NATS: their form, the digest kept of them, expiry, durations, names and groups,
the bucket's name and the records' encoding."""

from __future__ import annotations

import hashlib
import re

import msgspec
import pytest

from shared import keystore
from tests.integration.conftest import make_config


def test_a_new_key_is_first_id_secret_and_parses_back_into_them():
    key, key_id, secret = keystore.new_key()
    assert key == f"first-{key_id}-{secret}"
    assert re.fullmatch(r"[0-9a-f]{12}", key_id)
    assert len(secret) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", secret)
    assert keystore.parse(key) == (key_id, secret)


def test_new_keys_differ_in_id_and_secret():
    made = [keystore.new_key() for _ in range(200)]
    assert len({k[1] for k in made}) == len({k[2] for k in made}) == 200


def test_a_secret_with_dashes_parses_whole():
    """token_urlsafe uses '-': the id is cut by position, not at the last dash."""
    secret = "-ab" * 11
    assert keystore.parse(f"first-0123456789ab-{secret}") == ("0123456789ab", secret)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "first-",
        "sk-0123456789ab-" + "a" * 43,  # another service's key
        "First-0123456789ab-" + "a" * 43,
        "first-0123456789AB-" + "a" * 43,  # ids are lowercase
        "first-0123456789a-" + "a" * 43,  # 11 digits
        "first-0123456789abc-" + "a" * 43,  # 13 digits
        "first-0123456789ab" + "a" * 43,  # no dash
        "first-0123456789ab-" + "a" * 31,  # secret too short
        "first-0123456789ab-" + "a" * 257,  # longer than any we issue
        "first-0123456789ab-" + "a" * 42 + "=",  # not urlsafe base64
        "first-0123456789ab-" + "a" * 42 + " ",
        "first-0123456789ab-" + "a" * 43 + "\n",
        " first-0123456789ab-" + "a" * 43,
    ],
)
def test_malformed_keys_do_not_parse(text):
    assert keystore.parse(text) is None


def test_the_digest_is_the_sha256_of_the_secret_and_the_record_holds_only_that():
    key, _, secret = keystore.new_key()
    assert keystore.digest(secret) == hashlib.sha256(secret.encode()).digest()
    record = keystore.KeyRecord(name="a", secret_sha256=keystore.digest(secret).hex(), created=1.0)
    stored = keystore.encode(record)
    assert secret.encode() not in stored and key.encode() not in stored
    assert keystore.decode(stored) == record


def test_state_is_active_until_expiry_then_expired_and_revoked_above_both():
    r = keystore.KeyRecord(name="a", secret_sha256="0" * 64, created=100.0, expires=200.0)
    assert r.state(199.9) == "active"
    assert r.state(200.0) == "expired"
    assert msgspec.structs.replace(r, revoked=True).state(150.0) == "revoked"
    assert msgspec.structs.replace(r, revoked=True).state(300.0) == "revoked"
    assert msgspec.structs.replace(r, expires=None).state(1e12) == "active"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 43200),
        ("90m", 5400),
        ("45s", 45),
        ("2w", 14 * 86400),
        ("1.5h", 5400),
        (" 7D ", 7 * 86400),
    ],
)
def test_durations(text, seconds):
    assert keystore.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "d", "0d", "-1d", "30x", "30 d", "1d12h", "1e3s", "inf"])
def test_what_is_not_a_duration_says_what_one_looks_like(text):
    with pytest.raises(ValueError, match="like 30d, 12h or 90m"):
        keystore.parse_duration(text)


def test_groups_are_split_trimmed_and_each_kept_once_in_order():
    assert keystore.parse_groups("b, a,,b , c") == ["b", "a", "c"]
    assert keystore.parse_groups("") == []
    with pytest.raises(ValueError):
        keystore.parse_groups("x" * 257)
    with pytest.raises(ValueError):
        keystore.parse_groups(",".join(str(i) for i in range(1025)))


@pytest.mark.parametrize("name", ["", "   ", "x" * 257, "a\nb", "tab\there"])
def test_a_name_must_be_printable_and_fit_an_identity(name):
    with pytest.raises(ValueError):
        keystore.check_name(name)


def test_the_bucket_is_named_after_the_subject_prefix_unless_configured():
    assert keystore.bucket_name(make_config([])) == "first_keys"
    assert keystore.bucket_name(make_config([], nats={"subject_prefix": "site.prod"})) == "site_prod_keys"
    assert keystore.bucket_name(make_config([], auth={"methods": ["keys"], "keys": {"bucket": "K"}})) == "K"


def test_a_bucket_name_that_jetstream_would_refuse_is_a_config_error():
    with pytest.raises(msgspec.ValidationError, match=r"auth\.keys\.bucket"):
        make_config([], auth={"methods": ["keys"], "keys": {"bucket": "a.b"}})


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b'{"name": "a", "secret_sha256": "abc", "created": 1}',  # not a digest
        b'{"name": "", "secret_sha256": "' + b"0" * 64 + b'", "created": 1}',
        b'{"name": "' + b"x" * 257 + b'", "secret_sha256": "' + b"0" * 64 + b'", "created": 1}',
        b'{"secret_sha256": "' + b"0" * 64 + b'", "created": 1}',  # no name
    ],
)
def test_records_that_could_not_make_a_valid_identity_do_not_decode(value):
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
        keystore.decode(value)


def test_records_with_fields_a_newer_version_added_still_decode():
    value = b'{"name": "a", "secret_sha256": "' + b"0" * 64 + b'", "created": 1, "note": "x"}'
    assert keystore.decode(value).name == "a"


def test_iso_times_are_utc_with_a_z():
    assert keystore.iso(0) == "1970-01-01T00:00:00Z"
    assert keystore.iso(None) is None
