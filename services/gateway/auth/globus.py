"""Globus Auth access tokens, checked as FIRST checks them: the token's introspection and groups from
Globus (globus_api), then FIRST's rules (globus_identity).

A token's outcome is cached by the token's sha256: an identity until the token expires or for
``cache_s``, whichever is sooner (the entry is kept to ``cache_s``, so that a token used past
its expiry hears "Access token expired."); a refusal for ``failure_cache_s``. Globus being
unreachable is not a refusal and is not cached. Requests that carry the same new token at once
share one look-up. The token itself is never kept past the look-up, nor logged. A string that
cannot be a bearer token (failures.token_shaped) is refused without a look-up.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from services.gateway.auth import globus_identity
from services.gateway.auth.failures import token_shaped
from services.gateway.auth.globus_api import GlobusApi
from services.gateway.auth.keys import PREFIX as KEY_PREFIX
from services.gateway.auth.token_cache import TokenCache
from shared import errors, schema
from shared.access_config import GlobusAuthConfig
from shared.config import ConfigError

# Look-ups of different new tokens that may call Globus at once; more wait for a thread.
THREADS = 16
INACTIVE = "Token introspection: Token is either not active or invalid"  # FIRST's words

_log = structlog.get_logger()


class GlobusAuthenticator:
    name = "globus"

    def __init__(self, settings: GlobusAuthConfig, *, clock: Callable[[], float] = time.time):
        self.settings = settings
        self._clock = clock  # wall clock: Globus gives expiries in unix seconds
        self._identities: TokenCache[tuple[schema.Identity, float]] = TokenCache(settings.cache_entries)
        self._refusals: TokenCache[errors.FirstError] = TokenCache(settings.cache_entries)
        self._lookups: dict[str, asyncio.Task[schema.Identity]] = {}
        self._api: GlobusApi | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.waiting = 0  # requests now waiting on a look-up

    def claims(self, credential: str) -> bool:
        return not credential.startswith(KEY_PREFIX)

    def known(self, credential: str) -> schema.Identity | None:
        now = self._clock()
        entry = self._identities.get(hashlib.sha256(credential.encode()).hexdigest(), now)
        if entry is None or now >= entry[1]:
            return None
        return entry[0]

    async def start(self) -> None:
        if self._api is not None:
            return
        if not self.settings.client_id:
            raise ConfigError("$.auth.globus.client_id: the gateway's Globus client id is required")
        secret = await asyncio.to_thread(_read_secret, self.settings.client_secret_file)
        self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="globus")
        self._api = GlobusApi(self.settings, secret)

    async def stop(self) -> None:
        lookups = list(self._lookups.values())
        for task in lookups:
            task.cancel()
        await asyncio.gather(*lookups, return_exceptions=True)
        if self._executor is not None:
            # A call already in Globus's hands ends within http_timeout_s; nobody waits for it.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._api is not None:
            self._api.close()
            self._api = None

    async def identify(self, credential: str) -> schema.Identity:
        if not token_shaped(credential):  # cannot be a token: Globus never hears of it
            raise errors.Unauthorized(INACTIVE)
        key = hashlib.sha256(credential.encode()).hexdigest()
        identity = self._cached(key)
        if identity is not None:
            return identity
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = asyncio.create_task(self._look_up(credential, key), name="globus-lookup")
            self._lookups[key] = lookup
            lookup.add_done_callback(functools.partial(self._landed, key))
        self.waiting += 1
        try:
            # Shielded: a caller that goes away leaves the look-up to the others (and the cache).
            return await asyncio.shield(lookup)
        finally:
            self.waiting -= 1

    def _cached(self, key: str) -> schema.Identity | None:
        now = self._clock()
        refusal = self._refusals.get(key, now)
        if refusal is not None:
            raise type(refusal)(refusal.message)  # the same refusal, a fresh exception
        entry = self._identities.get(key, now)
        if entry is None:
            return None
        identity, expires = entry
        if now >= expires:
            raise errors.Unauthorized("Access token expired.")
        return identity

    async def _look_up(self, token: str, key: str) -> schema.Identity:
        started = time.monotonic()
        try:
            identity, expires = await self._check(token)
        except (errors.Unauthorized, errors.Forbidden) as exc:
            self._refusals.put(key, exc, self._clock() + self.settings.failure_cache_s)
            _log.info("globus_refused", token_sha=key[:12], status=exc.status, reason=exc.message[:200])
            raise
        except errors.NoCapacity as exc:
            _log.warning("globus_unavailable", token_sha=key[:12], reason=exc.message)
            raise
        self._identities.put(key, (identity, expires), self._clock() + self.settings.cache_s)
        _log.info(
            "globus_identified",
            token_sha=key[:12],
            user=identity.user,
            kind=identity.kind,
            idp=identity.idp,
            groups=len(identity.groups),
            seconds=round(time.monotonic() - started, 4),
        )
        return identity

    async def _check(self, token: str) -> tuple[schema.Identity, float]:
        """The identity behind the token, and when the token expires (unix seconds)."""
        introspection = await self._call(self._api_or_fail().introspect, token)
        if introspection.get("active") is not True:
            raise errors.Unauthorized(INACTIVE)
        expires = introspection.get("exp")
        if not isinstance(expires, int | float) or isinstance(expires, bool):
            raise errors.Unauthorized("Token introspection: Globus gave the token no expiry.")
        if expires <= self._clock():
            raise errors.Unauthorized("Access token expired.")
        found = globus_identity.candidate(introspection, self.settings)
        groups = await self._call(self._api_or_fail().group_ids, token)
        return globus_identity.admit(found, groups, self.settings), float(expires)

    async def _call(self, method: Callable[[str], Any], token: str) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, method, token)

    def _api_or_fail(self) -> GlobusApi:
        if self._api is None:
            raise errors.NoCapacity("Globus token checks are not running (the gateway is stopping).")
        return self._api

    def _landed(self, key: str, lookup: asyncio.Task) -> None:
        if self._lookups.get(key) is lookup:
            del self._lookups[key]
        if not lookup.cancelled():
            lookup.exception()  # retrieved: every waiter may have gone


def _read_secret(path: str) -> str:
    """The client secret, read once at start. Unreadable or empty: the gateway does not start."""
    field = "$.auth.globus.client_secret_file"
    if not path:
        raise ConfigError(f"{field}: required: a file that holds the gateway's Globus client secret")
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{field}: {path} is not text") from None
    if not secret:
        raise ConfigError(f"{field}: {path} is empty")
    return secret
