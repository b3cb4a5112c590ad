"""The PBS Pro provider (as at ALCF: Polaris, Aurora): ``qsub``, one ``qstat -xf -F json``, ``qdel``.

The job's resources go on qsub's command line as PBS Pro documents them: ``-l select=<nodes>:
ncpus=<n>:ngpus=<n>[:extra]``, ``-l walltime=HH:MM:SS``, ``-l filesystems=home:eagle``,
``-l place=scatter``, ``-q <queue>``, ``-A <project>``; the site's extra lines go in the script as
``#PBS`` directives. ``qstat -x`` keeps finished jobs, so how a job ended is read from the same
query (its ``Exit_status`` and ``comment``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from services.scaler.providers import scheduler_cli
from services.scaler.providers.base import NodeSpec
from services.scaler.providers.batch import BatchProvider, JobStatus
from services.scaler.providers.batch_script import clock, job_name
from shared.provider_config import PbsSettings

_QUEUED = {"Q", "H", "W", "T", "S", "U", "M"}  # queued, held, waiting, in transit, suspended...
_RUNNING = {"R", "E", "B"}  # running, exiting, array begun
_JOB_GONE = (35, 153)  # qdel: "Job has finished", "Unknown Job Id"
_WALLTIME_KILLED = -29  # JOB_EXEC_KILL_WALLTIME


def _seconds(walltime: str | None) -> float | None:
    try:
        h, m, s = (int(x) for x in str(walltime).split(":"))
    except ValueError:
        return None
    return float(h * 3600 + m * 60 + s)


def _ctime(text: str | None) -> float | None:
    """PBS's times in JSON: ctime strings ("Fri Nov 27 15:00:00 2026") or unix seconds."""
    if text is None:
        return None
    if isinstance(text, int | float) or str(text).isdigit():
        return float(text)
    try:
        return time.mktime(time.strptime(str(text), "%a %b %d %H:%M:%S %Y"))
    except ValueError:
        return None


def _ended(state: str, attrs: dict) -> JobStatus:
    code = attrs.get("Exit_status")
    comment = attrs.get("comment", "")
    if code == 0:
        return JobStatus("ended", state, "finished: the job's workers exited")
    if code is None:
        return JobStatus("ended", state, f"finished: {comment or 'deleted'}", failed=True)
    if code == _WALLTIME_KILLED:
        what = "the job reached its walltime"
    elif code == 128 + 15:
        what = "the job was terminated (qdel, or PBS ended it)"
    elif code > 256:
        what = f"killed by signal {code - 256}" + (" (qdel)" if code - 256 == 15 else "")
    elif code < 0:
        what = f"PBS could not run the job (Exit_status {code})"
    else:
        what = f"a worker exited with status {code}"
    return JobStatus("ended", state, f"finished: {what}" + (f" ({comment})" if comment else ""), failed=True)


def status_of(attrs: dict) -> JobStatus:
    """One job of ``qstat -xf -F json`` as a node's phase and reason."""
    state = str(attrs.get("job_state", "?"))
    resources = attrs.get("Resource_List", {})
    hosts = attrs.get("exec_host", "")
    details = {
        "host": "+".join(h.split("/")[0] for h in hosts.split("+")) if hosts else "",
        "nodes_reserved": resources.get("nodect"),
        "walltime": _seconds(resources.get("walltime")),
        "estimated_start": _ctime((attrs.get("estimated") or {}).get("start_time")),
        "started": _ctime(attrs.get("stime")),
    }
    if state in _QUEUED:
        comment = attrs.get("comment", "")
        result = JobStatus("queued", state, f"{state}: {comment}" if comment else state)
    elif state in _RUNNING:
        result = JobStatus("running", state, "")
    else:  # F (finished), X (subjob finished)
        result = _ended(state, attrs)
    result.details = details
    return result


class PbsProvider(BatchProvider):
    name = "pbs"
    settings: PbsSettings

    def directives(self, spec: NodeSpec) -> list[str]:
        return [f"#PBS {d}" for d in self.settings.extra_directives]

    def qsub_argv(self, script: Path, spec: NodeSpec) -> list[str]:
        s = self.settings
        select = f"{s.nodes}"
        if s.ncpus:
            select += f":ncpus={s.ncpus}"
        if s.ngpus:
            select += f":ngpus={s.ngpus}"
        if s.select_extra:
            select += f":{s.select_extra}"
        argv = ["qsub", "-N", job_name(spec), "-j", "oe", "-o", str(self.work_dir / f"{spec.node_id}.out")]
        argv += ["-l", f"select={select}"]
        if spec.walltime_s:
            argv += ["-l", f"walltime={clock(spec.walltime_s)}"]
        if s.filesystems:
            argv += ["-l", f"filesystems={s.filesystems}"]
        if s.place:
            argv += ["-l", f"place={s.place}"]
        if s.queue:
            argv += ["-q", s.queue]
        if s.account:
            argv += ["-A", s.account]
        return [*argv, str(script)]

    async def submit(self, script: Path, spec: NodeSpec) -> str:
        _, out, _ = await scheduler_cli.run(
            self.qsub_argv(script, spec), timeout_s=self.settings.command_timeout_s
        )
        job_id = out.strip()
        if not job_id or not job_id.split(".")[0].isdigit():
            raise scheduler_cli.SchedulerError(["qsub"], f"unexpected answer {job_id[:200]!r}")
        return job_id

    async def query(self, job_ids: list[str]) -> dict[str, JobStatus]:
        code, out, err = await scheduler_cli.run(
            ["qstat", "-xf", "-F", "json", *job_ids], timeout_s=self.settings.command_timeout_s, check=False
        )
        try:
            jobs = json.loads(out).get("Jobs", {}) if out.strip() else {}
        except (ValueError, AttributeError):
            raise scheduler_cli.SchedulerError(["qstat"], f"unreadable JSON: {out[:200]!r}") from None
        unknown_only = all("Unknown Job Id" in line for line in err.strip().splitlines())
        if code != 0 and not (code == 153 and unknown_only):
            raise scheduler_cli.SchedulerError(["qstat"], f"exited with status {code}: {err.strip()[-400:]}")
        return {job_id: status_of(attrs) for job_id, attrs in jobs.items() if isinstance(attrs, dict)}

    async def cancel(self, job_ids: list[str]) -> None:
        code, _, err = await scheduler_cli.run(
            ["qdel", *job_ids], timeout_s=self.settings.command_timeout_s, check=False
        )
        if code != 0 and code not in _JOB_GONE:
            raise scheduler_cli.SchedulerError(["qdel"], f"exited with status {code}: {err.strip()[-400:]}")
