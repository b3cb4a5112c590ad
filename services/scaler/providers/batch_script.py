"""The batch script a node's job runs: the site's environment, then ``first worker`` for each worker.

A site may replace the template (``script_template``); placeholders are ``{{name}}`` (so bash's own
``${...}`` stays as written) and are checked when the config is loaded. ``{{workers}}`` expands to
a block that starts every worker of the node in the background, forwards SIGTERM to them (Slurm
and PBS send it when they cancel the job, or at the walltime) and exits with the first failing
worker's status, so a crash shows as a failed job.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from services.scaler.providers.base import NodeSpec
from shared.provider_config import NodeCommandSettings, render_template

DEFAULT_TEMPLATE = """\
#!/bin/bash
{{directives}}
# FIRST node {{node_id}}: {{model}} on cluster {{cluster}}, submitted by the FIRST scaler.
set -u
{{setup}}
{{workers}}
"""

# Killed from outside (scancel, qdel, preemption): the workers drain, and the job still ends with
# 143 (SIGTERM), so the scheduler's record says it was ended, not that it finished.
_WAIT_ALL = """\
first_signalled=0
trap 'first_signalled=1; kill -TERM "${first_pids[@]}" 2>/dev/null' TERM INT
first_status=0
for pid in "${first_pids[@]}"; do
    while true; do
        wait "$pid"; rc=$?
        kill -0 "$pid" 2>/dev/null || break  # wait was only interrupted by the trap
    done
    [ "$first_status" -ne 0 ] || first_status=$rc
done
[ "$first_signalled" -eq 0 ] || exit 143
exit "$first_status"
"""


@dataclass(frozen=True)
class NodeCommand:
    """Where the node finds ``first``, the config, NATS and its seeds (the scaler's, unless the site
    says otherwise in the provider's table)."""

    first: list[str]
    config_path: str
    nats_url: str
    credentials_dir: str

    @classmethod
    def of(
        cls, settings: NodeCommandSettings, *, config_path: str, nats_url: str, credentials_dir: str
    ) -> NodeCommand:
        first = (
            shlex.split(settings.first_command)
            if settings.first_command
            else [sys.executable, "-m", "services.cli"]
        )
        return cls(
            first,
            settings.config_path or str(Path(config_path).resolve()),
            settings.nats_url or nats_url,
            settings.credentials_dir or credentials_dir,
        )

    def worker_argv(self, spec: NodeSpec, worker_id: str) -> list[str]:
        argv = [
            *self.first, "worker",
            "--config", self.config_path,
            "--nats", self.nats_url,
            "--cluster", spec.cluster,
            "--model", spec.model,
            "--worker-id", worker_id,
            "--node-id", spec.node_id,
        ]  # fmt: skip
        if self.credentials_dir:
            argv += ["--credentials", str(Path(self.credentials_dir) / f"{worker_id}.nk")]
        if spec.walltime_s:
            argv += ["--walltime", f"{spec.walltime_s:g}"]
        return argv


def workers_block(spec: NodeSpec, command: NodeCommand, settings: NodeCommandSettings) -> str:
    """Start each of the node's workers in the background (each with its own GPUs when the site
    splits the node), then wait for all of them."""
    lines = ["first_pids=()"]
    for i, worker_id in enumerate(spec.worker_ids):
        env = ""
        if settings.gpus_per_worker:
            n = settings.gpus_per_worker
            env = f"{settings.gpu_env}={','.join(str(g) for g in range(i * n, (i + 1) * n))} "
        lines += [f"{env}{shlex.join(command.worker_argv(spec, worker_id))} &", "first_pids+=($!)"]
    return "\n".join(lines) + "\n" + _WAIT_ALL


def render(
    template: str,
    spec: NodeSpec,
    command: NodeCommand,
    settings: NodeCommandSettings,
    *,
    directives: list[str],
    job_name: str,
) -> str:
    return render_template(
        template,
        {
            "directives": "\n".join(directives),
            "setup": "\n".join(settings.setup),
            "workers": workers_block(spec, command, settings),
            "node_id": spec.node_id,
            "model": spec.model,
            "cluster": spec.cluster,
            "job_name": job_name,
        },
    )


def load_template(path: str) -> str:
    """The site's template (checked when the config was loaded), or the built-in one."""
    return Path(path).read_text() if path else DEFAULT_TEMPLATE


def clock(seconds: float) -> str:
    """A time limit as both Slurm (--time) and PBS (walltime) take it: HH:MM:SS, rounded up."""
    total = int(-(-seconds // 1))
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def job_name(spec: NodeSpec) -> str:
    """The job's name in the queue: FIRST's, and which node; short, as PBS allows 236 characters."""
    return f"first-{spec.node_id}"[:200]
