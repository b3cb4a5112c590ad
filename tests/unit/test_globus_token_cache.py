"""The token cache: entries by key until their own deadline, bounded so that a flood of random
tokens pushes out the oldest entries instead of growing memory."""

from __future__ import annotations

import pytest

from services.gateway.auth.token_cache import TokenCache


def test_an_entry_lives_until_its_deadline():
    cache: TokenCache[str] = TokenCache(10)
    cache.put("k", "v", until=100.0)
    assert cache.get("k", now=99.9) == "v"
    assert cache.get("k", now=100.0) is None
    assert len(cache) == 0  # an expired entry is dropped when met


def test_a_full_cache_drops_the_least_recently_used():
    cache: TokenCache[int] = TokenCache(3)
    for i in range(3):
        cache.put(f"k{i}", i, until=1e9)
    assert cache.get("k0", now=0) == 0  # k0 used: k1 is now the oldest
    for i in range(3, 1000):  # a flood of new keys
        cache.put(f"k{i}", i, until=1e9)
    assert len(cache) == 3
    assert [cache.get(k, now=0) for k in ("k0", "k1", "k997", "k998", "k999")] == [None, None, 997, 998, 999]


def test_putting_a_key_again_replaces_its_value_and_deadline():
    cache: TokenCache[str] = TokenCache(2)
    cache.put("k", "old", until=10)
    cache.put("k", "new", until=20)
    assert cache.get("k", now=15) == "new" and len(cache) == 1


def test_a_cache_holds_at_least_one_entry():
    with pytest.raises(ValueError):
        TokenCache(0)
