"""Which of a model's clusters a request may go to: one it is pinned to must serve the model and be
in service, and every one must admit its caller (allowed groups and IdP domains, shared/access.py).

The gateway refuses a FIRST-pinned path to a cluster the caller may not use, and a model none of
whose clusters admit them; the router holds every request to the same rule, whoever sent it (a
gateway, the batch service, a NATS-native caller). A request pinned to a cluster that does not
admit its caller is refused with 403. An unpinned one whose caller may use only some of the
model's clusters is pinned here to one of them: the cluster the routing choice would take now
among those, else the first not under maintenance. From then on it is held, scaled for and
dispatched as a pinned request is, so no worker of a closed cluster ever sees it.
"""

from __future__ import annotations

from services.router.registry import Registry
from shared import access, clusterstate, errors, schema
from shared import config as cfg


class ClusterAccess:
    def __init__(self, config: cfg.Config, registry: Registry, maintenance: clusterstate.MaintenanceFollower):
        self.config, self.registry, self.maintenance = config, registry, maintenance
        # Most deployments restrict no cluster: then nothing is looked at per request.
        self.active = any(c.allowed_groups or c.allowed_idp_domains for c in config.clusters)

    def refuse_pinned(
        self, model: cfg.ModelConfig, cluster: str, identity: schema.Identity | None
    ) -> errors.FirstError | None:
        """Why a request pinned to this cluster cannot be served there, if it cannot."""
        c = self.config.cluster(cluster)
        if cluster not in self.config.clusters_for(model) or c is None:
            return errors.EndpointNotFound.pinned(cluster, model.framework, model.id)
        if (message := self.maintenance.message(cluster)) is not None:
            return errors.ClusterUnderMaintenance(message)
        if not self.active or identity is None or access.cluster_admits(identity, c, self.config):
            return None
        return errors.Forbidden(
            f"You may not use the cluster '{cluster}': it is open to other groups or identity providers."
            " Ask the service's administrators for access, or use another cluster."
        )

    def place(self, identity: schema.Identity | None, model: cfg.ModelConfig) -> str:
        """``""``: any of the model's clusters; else the one cluster an unpinned request goes to.
        Raises Forbidden when the caller may use none."""
        if not self.active or identity is None:  # the stack's own caller, on no user's behalf
            return ""
        if (allowed := access.clusters_open_to(identity, model, self.config)) is None:
            return ""
        if not allowed:
            access.check(identity, model, self.config)  # raises, with the usual message
            raise errors.Forbidden(f"You may not use the model '{model.id}' on any of its clusters.")
        if len(allowed) == 1:
            return allowed[0]
        if (entry := self.registry.pick(model.id, clusters=allowed)) is not None:
            return entry.beat.cluster
        in_service = [c for c in allowed if c not in self.registry.maintenance]
        return (in_service or list(allowed))[0]
