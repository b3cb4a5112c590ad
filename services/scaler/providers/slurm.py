"""The Slurm provider: a node is a batch job (``sbatch --parsable``), watched with one ``squeue``.

Jobs that squeue no longer lists (past MinJobAge) are looked up with one ``sacct`` call. Slurm's
job states map to node states with the reason a person can act on: ``PENDING: Priority``,
``TIMEOUT: the job reached its time limit``, ``NODE_FAIL``...
"""

from __future__ import annotations

import datetime
from pathlib import Path

from services.scaler.providers import scheduler_cli
from services.scaler.providers.base import NodeSpec
from services.scaler.providers.batch import BatchProvider, JobStatus
from services.scaler.providers.batch_script import clock, job_name
from shared.provider_config import SlurmSettings

# squeue's fields, '|'-separated: id, state, reason, hosts, node count, time limit, start time.
_SQUEUE_FORMAT = "%i|%T|%r|%N|%D|%l|%S"
_QUEUED = {
    "PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
    "SPECIAL_EXIT", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING",
}  # fmt: skip
_RUNNING = {"RUNNING", "COMPLETING"}
# How a job ended, in words for the node's reason; COMPLETED is the one clean end.
_ENDED = {
    "COMPLETED": "the job's workers exited",
    "CANCELLED": "the job was cancelled (scancel)",
    "FAILED": "a worker exited with an error",
    "TIMEOUT": "the job reached its time limit",
    "NODE_FAIL": "a node of the job failed",
    "BOOT_FAIL": "a node of the job failed to boot",
    "DEADLINE": "the job reached its deadline",
    "OUT_OF_MEMORY": "the job ran out of memory",
    "PREEMPTED": "the job was preempted",
    "REVOKED": "the job was revoked (federation)",
}


def _seconds(limit: str) -> float | None:
    """Slurm's [D-]HH:MM:SS / MM:SS / UNLIMITED as seconds."""
    if not limit or limit in ("UNLIMITED", "INVALID", "NOT_SET", "N/A"):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts[-3:]
    return float((int(days or 0) * 24 + h) * 3600 + m * 60 + s)


def _timestamp(text: str) -> float | None:
    """squeue's start time (local time, ISO) as unix seconds; N/A and Unknown as None."""
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _status(state: str, reason: str, details: dict) -> JobStatus:
    state = state.split()[0] if state else "UNKNOWN"  # sacct: "CANCELLED by 0"
    reason = "" if reason in ("None", "(null)") else reason
    if state in _QUEUED:
        return JobStatus("queued", state, f"{state}: {reason}" if reason else state, details=details)
    if state in _RUNNING:
        return JobStatus("running", state, "", details=details)
    what = _ENDED.get(state, "ended")
    text = f"{state}: {what}" + (f" ({reason})" if reason and state != "COMPLETED" else "")
    return JobStatus("ended", state, text, failed=state != "COMPLETED", details=details)


class SlurmProvider(BatchProvider):
    name = "slurm"
    settings: SlurmSettings

    def directives(self, spec: NodeSpec) -> list[str]:
        s = self.settings
        options = [
            f"--job-name={job_name(spec)}",
            f"--nodes={s.nodes}",
            f"--output={self.work_dir / (spec.node_id + '-%j.out')}",
        ]
        for flag, value in (
            ("partition", s.partition),
            ("account", s.account),
            ("qos", s.qos),
            ("gres", s.gres),
            ("constraint", s.constraint),
        ):
            if value:
                options.append(f"--{flag}={value}")
        if s.gpus_per_node:
            options.append(f"--gpus-per-node={s.gpus_per_node}")
        if s.cpus_per_task:
            options.append(f"--cpus-per-task={s.cpus_per_task}")
        if spec.walltime_s:
            options.append(f"--time={clock(spec.walltime_s)}")
        options += s.extra_directives
        return [f"#SBATCH {o}" for o in options]

    async def submit(self, script: Path, spec: NodeSpec) -> str:
        try:
            _, out, _ = await scheduler_cli.run(
                ["sbatch", "--parsable", str(script)], timeout_s=self.settings.command_timeout_s
            )
        except scheduler_cli.SchedulerError as exc:
            if exc.returncode is None:  # no answer in time: the job may exist all the same
                await self._cancel_by_name(spec)
            raise
        job_id = out.strip().split(";")[0]  # --parsable: "<id>[;<cluster>]"
        if not job_id.isdigit():
            raise scheduler_cli.SchedulerError(["sbatch"], f"unexpected answer {out.strip()[:200]!r}")
        return job_id

    async def query(self, job_ids: list[str]) -> dict[str, JobStatus]:
        code, out, err = await scheduler_cli.run(
            [
                "squeue",
                "--noheader",
                "--states=all",
                f"--jobs={','.join(job_ids)}",
                f"--format={_SQUEUE_FORMAT}",
            ],
            timeout_s=self.settings.command_timeout_s,
            check=False,
        )
        if code != 0 and "Invalid job id" not in err:  # every listed job purged: not an error
            raise scheduler_cli.SchedulerError(["squeue"], f"exited with status {code}: {err.strip()[-400:]}")
        found: dict[str, JobStatus] = {}
        for line in out.splitlines():
            fields = line.strip().split("|")
            if len(fields) != 7:
                continue
            job_id, state, reason, hosts, count, limit, start = fields
            details = {
                "host": hosts,
                "nodes_reserved": int(count) if count.isdigit() else None,
                "walltime": _seconds(limit),
                "estimated_start" if state == "PENDING" else "started": _timestamp(start),
            }
            found[job_id] = _status(state, reason, details)
        missing = [j for j in job_ids if j not in found]
        if missing and self.settings.sacct:
            found |= await self._sacct(missing)
        return found

    async def _sacct(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """Jobs squeue forgot: how they ended, from accounting (or the completion log)."""
        argv = [
            "sacct", "--noheader", "--parsable2", "--allocations", *self.settings.sacct_args,
            f"--jobs={','.join(job_ids)}", "--format=JobID,State,Reason,NodeList,NNodes,Timelimit",
        ]  # fmt: skip
        try:
            _, out, _ = await scheduler_cli.run(argv, timeout_s=self.settings.command_timeout_s)
        except scheduler_cli.SchedulerError as exc:  # no accounting here: squeue's word stands
            self._log.info("node_job_sacct_failed", error=str(exc))
            return {}
        found = {}
        for line in out.splitlines():
            fields = line.strip().split("|")
            if len(fields) == 6 and fields[0] in job_ids:
                job_id, state, reason, hosts, count, limit = fields
                details = {
                    "host": hosts,
                    "nodes_reserved": int(count) if count.isdigit() else None,
                    "walltime": _seconds(limit),
                }
                found[job_id] = _status(state, reason, details)
        return found

    async def _cancel_by_name(self, spec: NodeSpec) -> None:
        """A submission that timed out may have gone through: its job (the name holds the node id,
        which is never reused) must not run unknown to the scaler."""
        try:
            await scheduler_cli.run(
                ["scancel", f"--name={job_name(spec)}"], timeout_s=self.settings.command_timeout_s
            )
        except scheduler_cli.SchedulerError as exc:
            self._log.warning("node_job_orphan_cancel_failed", node_id=spec.node_id, error=str(exc))

    async def cancel(self, job_ids: list[str]) -> None:
        await scheduler_cli.run(["scancel", *job_ids], timeout_s=self.settings.command_timeout_s)
