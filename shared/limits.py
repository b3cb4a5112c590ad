"""Request and token limits per user and model (``[limits]``): which apply to an identity.

Counting and enforcing them is a stub until the limiter lands.
"""

from __future__ import annotations

from shared import config as cfg
from shared import schema
from shared.access_config import LimitSet

UNLIMITED = LimitSet(requests_per_s=0, model_requests_per_s=0, tokens_per_min=0, model_tokens_per_min=0)


def limits_for(identity: schema.Identity, config: cfg.Config) -> LimitSet:
    """The limits of an identity: the deployment's, or the most generous of its groups' overrides.
    An open deployment (``auth.methods = ["none"]``) has one anonymous user and no limits."""
    if identity.kind == "anonymous":
        return UNLIMITED
    sets = [config.limits.groups[g] for g in identity.groups if g in config.limits.groups]
    if not sets:
        return config.limits.user

    def most(field: str) -> float:
        values = [getattr(s, field) for s in sets]
        return 0 if 0 in values else max(values)  # 0 is no limit: the most generous of all

    return LimitSet(
        requests_per_s=most("requests_per_s"),
        model_requests_per_s=most("model_requests_per_s"),
        tokens_per_min=int(most("tokens_per_min")),
        model_tokens_per_min=int(most("model_tokens_per_min")),
    )
