"""The configuration of who may call, how much, and what is recorded: ``[auth]``, ``[limits]``,
``[usage]``. Part of the one config file (shared/config.py); docs/config.md describes every field."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(gt=0)]


class _Cfg(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class GlobusAuthConfig(_Cfg):
    """Globus Auth, as FIRST checks it (docs/config.md, "[auth.globus]")."""

    client_id: str = ""  # the gateway's confidential client (FIRST's GLOBUS_APPLICATION_ID)
    client_secret_file: str = ""  # a file holding its secret, never the secret itself
    allowed_idp_domains: list[str] = msgspec.field(default_factory=list)  # empty: any
    policies: list[str] = msgspec.field(default_factory=list)  # Globus policy ids, all must pass
    groups: list[str] = msgspec.field(default_factory=list)  # if set, a user must be in one of them
    groups_per_idp: dict[str, list[str]] = msgspec.field(default_factory=dict)  # idp domain -> groups
    service_usernames: list[str] = msgspec.field(default_factory=list)  # client-credentials identities
    cache_s: PosFloat = 600.0  # a valid token's introspection is reused this long (or to its expiry)
    failure_cache_s: PosFloat = 60.0  # a refused token's refusal is reused this long
    cache_entries: PosInt = 10_000  # tokens remembered, each of successes and refusals (oldest go first)
    http_timeout_s: PosFloat = 10.0  # one call to Globus; past it the request gets 503
    auth_url: str = ""  # Globus Auth's base URL; empty: production (tests point it at a double)
    groups_url: str = ""  # the Groups API's base URL; empty: production


class KeysConfig(_Cfg):
    """API keys, made with ``first keys create`` and kept hashed in JetStream KV."""

    # The KV bucket; empty: the subject prefix with "_" for its dots, and "_keys" ("first_keys").
    bucket: Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_-]*$", max_length=200)] = ""
    # Copies JetStream keeps of the bucket (1 to 5, at most the servers of a clustered hub); 0: one
    # at creation, and whatever it has later (an operator may have changed it).
    replicas: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0


class AuthConfig(_Cfg):
    # Which credentials the gateway takes. "none": everyone is anonymous, allowed only while the
    # gateway listens on loopback.
    methods: list[Literal["none", "keys", "globus"]] = msgspec.field(default_factory=lambda: ["none"])
    globus: GlobusAuthConfig = msgspec.field(default_factory=GlobusAuthConfig)
    keys: KeysConfig = msgspec.field(default_factory=KeysConfig)
    # Refused credentials (401) one client address may send in a minute; beyond it, new ones get
    # 429 without being looked up (services/gateway/auth/failures.py). 0: no bound.
    max_failures_per_min: NonNegInt = 60


class LimitSet(_Cfg):
    """Per user; 0 turns a limit off. FIRST's defaults: 10 requests/s, 60,000 tokens/min per model.
    Requests count over a sliding second and tokens over a sliding minute (shared/limits_ledger.py)."""

    requests_per_s: NonNegFloat = 10.0  # all models together
    model_requests_per_s: NonNegFloat = 0.0  # each model
    tokens_per_min: NonNegInt = 0  # all models together
    model_tokens_per_min: NonNegInt = 60_000  # each model

    def __post_init__(self) -> None:
        # Requests count in a one-second window: a rate below one a second cannot be told apart
        # from one a second there, so it is refused rather than silently rounded up.
        for name in ("requests_per_s", "model_requests_per_s"):
            if 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be 0 (no limit) or at least 1")


class LimitsConfig(_Cfg):
    user: LimitSet = msgspec.field(default_factory=LimitSet)
    # Overrides for members of a group (the most generous of a user's groups applies).
    groups: dict[str, LimitSet] = msgspec.field(default_factory=dict)


class UsageConfig(_Cfg):
    """One usage record per run of a request, in a JetStream stream (shared/usage_stream.py);
    ``first usage`` reads it."""

    # Empty: derived from nats.subject_prefix ("first" -> "FIRST_USAGE"). A JetStream stream name.
    stream: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,255}$")] = ""
    # The stream's max_age; at most 100 years, which JetStream's nanoseconds can hold.
    retention_days: Annotated[float, msgspec.Meta(gt=0, le=36_500)] = 400.0
    # Copies JetStream keeps of the stream (1 to 5); routers keep it there. 0: one at creation,
    # and whatever it has later.
    replicas: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0
