"""The provider a cluster's config names, built with that provider's table (``[clusters.<provider>]``)."""

from __future__ import annotations

from services.scaler.providers.base import NodeProvider
from shared import config as cfg
from shared.provider_config import PbsSettings, SlurmSettings


def build_batch_or_globus(
    cluster: cfg.ClusterConfig, *, config_path: str, nats_url: str, credentials_dir: str
) -> NodeProvider:
    """A slurm, pbs or globus_compute provider (``local`` is built by services/run.py as before)."""
    where = dict(config_path=config_path, nats_url=nats_url, credentials_dir=credentials_dir)
    match cluster.provider:
        case "slurm":
            from services.scaler.providers.slurm import SlurmProvider

            return SlurmProvider(cluster.slurm or SlurmSettings(), **where)
        case "pbs":
            from services.scaler.providers.pbs import PbsProvider

            return PbsProvider(cluster.pbs or PbsSettings(), **where)
        case "globus_compute":
            from services.scaler.providers.globus_compute import GlobusComputeProvider

            assert cluster.globus_compute is not None  # the config check requires the table
            return GlobusComputeProvider(cluster.globus_compute, **where)
    raise ValueError(f"cluster {cluster.name}: unknown provider {cluster.provider!r}")
