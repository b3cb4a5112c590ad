"""Each HPC node provider's settings: a table under a cluster, named after its provider.

    [[clusters]]
    name = "polaris"
    provider = "pbs"
    [clusters.pbs]
    queue = "debug"
    account = "FIRST"

docs/providers.md says how a site fills them in; docs/config.md lists every field.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]

# What a site's script template may name; {{workers}} is required (it starts the workers).
TEMPLATE_FIELDS = frozenset({"directives", "setup", "workers", "node_id", "model", "cluster", "job_name"})
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class _Cfg(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NodeCommandSettings(_Cfg):
    """How a node runs ``first worker``: where the program, the config and NATS are, as the node sees them."""

    # Shell words that run `first` on the node, e.g. "/lus/eagle/first/venv/bin/first".
    # Empty: the scaler's own Python (`<python> -m services.cli`), for a node that shares its install.
    first_command: str = ""
    config_path: str = ""  # the config file as the node sees it; empty: the scaler's
    nats_url: str = ""  # the NATS URL the node connects to; empty: the scaler's
    credentials_dir: str = ""  # the worker slots' seeds on the node; empty: nats.worker_credentials_dir
    # Shell lines run before the workers start: modules, a venv, HF_HOME, HF_HUB_OFFLINE=1, ...
    setup: list[str] = msgspec.field(default_factory=list)
    # Several workers on one node: each gets this many GPUs, named in gpu_env (0: not set).
    gpus_per_worker: NonNegInt = 0
    gpu_env: EnvName = "CUDA_VISIBLE_DEVICES"  # Aurora's Intel GPUs: ZE_AFFINITY_MASK


class BatchSettings(NodeCommandSettings):
    """A batch scheduler's job: the script, how often the scaler asks about jobs, how it stops them."""

    # A batch script template (a file; relative paths: to the config file). Empty: the built-in one.
    # It names {{directives}}, {{setup}}, {{workers}} (required), {{node_id}}, {{model}}, {{cluster}}.
    script_template: str = ""
    # Where job scripts and job output go (the output must be writable from the node; relative:
    # to the config file). Empty: a temporary folder of the scaler.
    work_dir: str = ""
    extra_directives: list[str] = msgspec.field(default_factory=list)  # e.g. "--exclusive"
    poll_interval_s: PosFloat = 30.0  # one status query for every job of the cluster, this often
    command_timeout_s: PosFloat = 30.0  # a scheduler command that takes longer is killed and reported
    # After a release, how long the node's workers have to drain and exit before the job is cancelled.
    cancel_grace_s: NonNegFloat = 330.0


class SlurmSettings(BatchSettings):
    partition: str = ""
    account: str = ""
    qos: str = ""
    nodes: PosInt = 1
    gres: str = ""  # e.g. "gpu:4"
    gpus_per_node: NonNegInt = 0
    cpus_per_task: NonNegInt = 0
    constraint: str = ""
    # Jobs that squeue no longer lists are looked up with sacct, with these extra arguments
    # (e.g. ["--completion"] where only job completion logging is on); false: they are reported gone.
    sacct: bool = True
    sacct_args: list[str] = msgspec.field(default_factory=list)


class PbsSettings(BatchSettings):
    queue: str = ""  # -q
    account: str = ""  # -A (the project)
    nodes: PosInt = 1  # -l select=<nodes>:ncpus=..:ngpus=..
    ncpus: NonNegInt = 0
    ngpus: NonNegInt = 0
    select_extra: str = ""  # appended to the select chunk, e.g. "system=polaris"
    filesystems: str = ""  # -l filesystems=..., e.g. "home:eagle" (ALCF)
    place: str = ""  # -l place=..., e.g. "scatter"


class GlobusComputeSettings(NodeCommandSettings, kw_only=True):
    """Workers started as a Globus Compute task on a site's endpoint (whose provider gets the node)."""

    endpoint_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")]
    # Passed as user_endpoint_config to a multi-user endpoint's template (account, queue, walltime...).
    endpoint_config: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)
    # The Globus app credentials (GLOBUS_COMPUTE_CLIENT_ID/SECRET) are read from this file: two
    # lines, client id then secret. Empty: the SDK's own login (a stored token).
    client_credentials_file: str = ""


def template_fields(text: str) -> set[str]:
    return set(_PLACEHOLDER.findall(text))


def check_template(text: str, where: str) -> None:
    unknown = template_fields(text) - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(
            f"{where}: unknown placeholder(s) {sorted(unknown)} (known: {sorted(TEMPLATE_FIELDS)})"
        )
    if "workers" not in template_fields(text):
        raise ValueError(f"{where}: the template must contain {{{{workers}}}} (it starts the workers)")


def render_template(text: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


PROVIDER_TABLES = ("slurm", "pbs", "globus_compute")


def check_cluster(i: int, cluster) -> None:
    """One cluster's provider and provider table fit together; a site template is readable and valid."""
    where = f"$.clusters[{i}]"
    for table in PROVIDER_TABLES:
        if getattr(cluster, table) is not None and cluster.provider != table:
            raise ValueError(f"{where}.{table}: set, but the cluster's provider is {cluster.provider!r}")
    if cluster.provider == "globus_compute" and cluster.globus_compute is None:
        raise ValueError(f"{where}.globus_compute: provider 'globus_compute' needs this table (endpoint_id)")
