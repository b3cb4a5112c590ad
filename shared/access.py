"""What an identity may use: the models and clusters whose allowed groups and identity-provider
domains admit it. One rule for the gateway (403, and what /v1/models lists) and the routers
(NATS-native callers)."""

from __future__ import annotations

from shared import config as cfg
from shared import errors, schema


def _admits(identity: schema.Identity, groups: list[str], domains: list[str]) -> bool:
    if groups and not set(groups).intersection(identity.groups):
        return False
    return not domains or identity.idp in domains


def may_use(identity: schema.Identity, model: cfg.ModelConfig, config: cfg.Config) -> bool:
    """The model admits the identity, and so does at least one of its clusters."""
    if identity.kind == "anonymous" and "none" in config.auth.methods:
        return True  # an open deployment: nothing is checked
    if not _admits(identity, model.allowed_groups, model.allowed_idp_domains):
        return False
    names = model.clusters  # empty: every cluster (Config.clusters_for); one pass, run per request
    for c in config.clusters:
        if (not names or c.name in names) and _admits(identity, c.allowed_groups, c.allowed_idp_domains):
            return True
    return False


def cluster_admits(identity: schema.Identity, cluster: cfg.ClusterConfig, config: cfg.Config) -> bool:
    if identity.kind == "anonymous" and "none" in config.auth.methods:
        return True
    return _admits(identity, cluster.allowed_groups, cluster.allowed_idp_domains)


def clusters_open_to(
    identity: schema.Identity, model: cfg.ModelConfig, config: cfg.Config
) -> tuple[str, ...] | None:
    """The model's clusters this identity may use, or None when it may use every one of them (the
    usual case: nothing to narrow). A cluster's allowed groups and IdP domains bind unpinned
    requests too, not only FIRST's pinned paths."""
    if identity.kind == "anonymous" and "none" in config.auth.methods:
        return None
    names = config.clusters_for(model)
    allowed = tuple(
        n for n in names if (c := config.cluster(n)) is None or cluster_admits(identity, c, config)
    )
    return None if len(allowed) == len(names) else allowed


def may_use_on(
    identity: schema.Identity, model: cfg.ModelConfig, cluster: cfg.ClusterConfig, config: cfg.Config
) -> bool:
    """The model, on this cluster (one of its clusters), admits the identity."""
    if cluster.name not in config.clusters_for(model):
        return False
    if identity.kind == "anonymous" and "none" in config.auth.methods:
        return True
    return _admits(identity, model.allowed_groups, model.allowed_idp_domains) and cluster_admits(
        identity, cluster, config
    )


def check(identity: schema.Identity, model: cfg.ModelConfig, config: cfg.Config) -> None:
    if not may_use(identity, model, config):
        signed_in = f" (you signed in through {identity.idp})" if identity.idp else ""
        raise errors.Forbidden(
            f"You may not use the model '{model.id}': it is open to other groups or identity providers"
            f"{signed_in}. Ask the service's administrators for access, or sign in with an identity they allow.",
            param="model",
        )
