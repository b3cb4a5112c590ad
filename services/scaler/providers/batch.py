"""What Slurm and PBS nodes have in common: one batch job per node, watched with one query per interval.

A subclass says how to submit a script, how to ask about a list of jobs in one command, and how to
cancel; this class keeps the job table. ``start_node`` writes the script (kept in ``work_dir``, for
whoever wants to see what ran) and submits it; a refused submission raises with the scheduler's
stderr and the scaler backs off. ``poll`` is called every scaler tick but asks the scheduler only
every ``poll_interval_s``, about every job at once. ``stop_node`` gives a running job's workers
``cancel_grace_s`` to drain (the scaler asked them over NATS) before it cancels the job; a job
still queued is cancelled at once.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import structlog

from services.scaler.providers import batch_script
from services.scaler.providers.base import NodeProvider, NodeSpec
from services.scaler.providers.scheduler_cli import SchedulerError
from shared import schema
from shared.provider_config import BatchSettings

Phase = Literal["queued", "running", "ended"]
# A job the scheduler no longer knows about, after this many queries in a row: gone.
_MISSES_TO_GONE = 2


@dataclass
class JobStatus:
    """One job as the scheduler last reported it, in its own words (``state``) and ours (``phase``)."""

    phase: Phase
    state: str  # the scheduler's: PENDING, RUNNING, TIMEOUT...; Q, R, F...
    reason: str = ""  # why it waits, or how it ended
    failed: bool = False  # ended other than by finishing cleanly
    details: dict = field(default_factory=dict)  # host, nodes_reserved, walltime, estimated_start


@dataclass
class _Job:
    spec: NodeSpec
    job_id: str
    state: schema.NodeState = "requested"
    reason: str = ""
    status: JobStatus | None = None
    cancel_at: float | None = None  # monotonic; set by stop_node
    adopted: bool = False  # from an earlier scaler: its phase is unknown until the first query
    cancelled: bool = False
    misses: int = 0


class BatchProvider(NodeProvider):
    """A batch scheduler's nodes; subclasses: ``SlurmProvider``, ``PbsProvider``."""

    settings: BatchSettings

    def __init__(
        self,
        settings: BatchSettings,
        *,
        config_path: str,
        nats_url: str,
        credentials_dir: str = "",
    ):
        self.settings = settings
        self.command = batch_script.NodeCommand.of(
            settings, config_path=config_path, nats_url=nats_url, credentials_dir=credentials_dir
        )
        self.template = batch_script.load_template(settings.script_template)
        if settings.work_dir:
            self.work_dir = Path(settings.work_dir)
            self._tmp = None
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"first-{self.name}-")
            self.work_dir = Path(self._tmp.name)
        self._jobs: dict[str, _Job] = {}
        self._next_query = 0.0
        self.last_error = ""  # the last failed query, for status; cleared by the next good one
        self._log = structlog.get_logger().bind(service="scaler", provider=self.name)

    # --- what a scheduler says -----------------------------------------------------------------

    @abc.abstractmethod
    def directives(self, spec: NodeSpec) -> list[str]:
        """The script's scheduler lines (#SBATCH ..., #PBS ...)."""

    @abc.abstractmethod
    async def submit(self, script: Path, spec: NodeSpec) -> str:
        """Submit the script; the job id. Raises SchedulerError with the scheduler's words."""

    @abc.abstractmethod
    async def query(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """Every listed job the scheduler still knows, in one query (two at most)."""

    @abc.abstractmethod
    async def cancel(self, job_ids: list[str]) -> None:
        """Cancel the jobs (one command)."""

    # --- the NodeProvider contract ---------------------------------------------------------------

    def script(self, spec: NodeSpec) -> str:
        return batch_script.render(
            self.template,
            spec,
            self.command,
            self.settings,
            directives=self.directives(spec),
            job_name=batch_script.job_name(spec),
        )

    async def start_node(self, spec: NodeSpec) -> None:
        path = self.work_dir / f"{spec.node_id}-{int(time.time())}.sh"
        await asyncio.to_thread(_write_script, path, self.script(spec))  # work_dir may be on Lustre
        job_id = await self.submit(path, spec)  # raises: the scaler reports it and backs off
        self._jobs[spec.node_id] = _Job(spec, job_id, reason=f"submitted as job {job_id}")
        self._next_query = min(self._next_query, time.monotonic() + min(2.0, self.settings.poll_interval_s))
        self._log.info("node_job_submitted", node_id=spec.node_id, job_id=job_id, script=str(path))

    async def stop_node(self, node_id: str) -> None:
        job = self._jobs.get(node_id)
        if job is None or job.cancel_at is not None or job.state in ("failed", "stopped"):
            return
        if job.status is None:  # submitted just now (still queued), or adopted (may be running)
            waiting = not job.adopted
        else:
            waiting = job.status.phase == "queued"
        job.cancel_at = time.monotonic() + (0.0 if waiting else self.settings.cancel_grace_s)
        job.state = "stopping"
        await self._cancel_due()

    async def poll(self) -> dict[str, tuple[schema.NodeState, str]]:
        await self._cancel_due()
        if self._jobs and time.monotonic() >= self._next_query:
            try:
                await self._refresh()
            finally:  # counted from the answer: a scheduler slower than the interval is not asked again at once
                self._next_query = time.monotonic() + self.settings.poll_interval_s
        states = {node_id: (job.state, job.reason) for node_id, job in self._jobs.items()}
        for node_id, job in list(self._jobs.items()):
            if job.state in ("failed", "stopped"):
                del self._jobs[node_id]  # reported once, then forgotten
        return states

    def details(self) -> dict[str, dict]:
        out = {}
        for node_id, job in self._jobs.items():
            info = {"job_id": job.job_id, "reason": job.reason}
            if job.status is not None:
                info |= {"job_state": job.status.state, **job.status.details}
            out[node_id] = info
        return out

    async def adopt(self, spec: NodeSpec, job_id: str) -> bool:
        self._jobs[spec.node_id] = _Job(spec, job_id, reason=f"adopted job {job_id}", adopted=True)
        self._next_query = 0.0  # learn its state at the next poll
        return True

    async def forget(self) -> None:
        self._jobs.clear()

    async def close(self) -> None:
        """The stack stops in order: cancel every job now (its workers get SIGTERM and drain)."""
        live = [j for j in self._jobs.values() if j.state not in ("failed", "stopped") and not j.cancelled]
        for job in live:
            job.cancel_at, job.state = time.monotonic(), "stopping"
        await self._cancel_due()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()

    # --- the job table ---------------------------------------------------------------------------

    async def _cancel_due(self) -> None:
        now = time.monotonic()
        due = [
            j
            for j in self._jobs.values()
            if j.cancel_at is not None and not j.cancelled and now >= j.cancel_at
        ]
        if not due:
            return
        try:
            await self.cancel([j.job_id for j in due])
        except SchedulerError as exc:
            self._log.warning("node_job_cancel_failed", jobs=[j.job_id for j in due], error=str(exc))
            for job in due:  # try again after an interval, not every tick
                job.cancel_at = now + self.settings.poll_interval_s
            return
        for job in due:
            job.cancelled = True
            self._log.info("node_job_cancelled", node_id=job.spec.node_id, job_id=job.job_id)

    async def _refresh(self) -> None:
        live = {j.job_id: j for j in self._jobs.values() if j.state not in ("failed", "stopped")}
        if not live:
            return
        try:
            statuses = await self.query(list(live))
        except SchedulerError as exc:
            # Raised to the scaler, which reports the cluster's provider failed and backs off;
            # the next query is an interval away in any case.
            self.last_error = str(exc)
            self._log.warning("node_job_query_failed", error=self.last_error)
            raise
        self.last_error = ""
        for job_id, job in live.items():
            status = statuses.get(job_id)
            if status is None:
                job.misses += 1
                if job.misses >= _MISSES_TO_GONE:
                    gone = "stopped" if job.cancel_at is not None else "failed"
                    self._set(job, gone, f"job {job_id} is no longer known to {self.name}")
                continue
            job.misses, job.status = 0, status
            self._apply(job, status)

    def _apply(self, job: _Job, status: JobStatus) -> None:
        if status.phase == "ended":
            if job.cancel_at is not None or not status.failed:
                self._set(job, "stopped", status.reason)
            else:
                self._set(job, "failed", status.reason)
        elif job.cancel_at is not None:
            self._set(job, "stopping", status.reason)
        elif status.phase == "running":
            self._set(job, "running", status.reason)
        else:
            self._set(job, "requested", status.reason)

    def _set(self, job: _Job, state: schema.NodeState, reason: str) -> None:
        if (job.state, job.reason) != (state, reason):
            self._log.info(
                "node_job_state", node_id=job.spec.node_id, job_id=job.job_id, state=state, reason=reason
            )
        job.state, job.reason = state, reason


def _write_script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
