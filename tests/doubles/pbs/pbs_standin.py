"""A thin stand-in for PBS Pro's qsub, qstat and qdel (OpenPBS is not packaged for Debian).

TEST DOUBLE. It keeps a real job table (one JSON file per job under $PBS_STANDIN_DIR) and runs
each job's script as a process on this machine; it is not a scheduler. What it checks is the
command lines: options and resources are parsed as PBS Pro documents them (qsub -q, -A, -N, -o,
-j oe, -l select=<n>:ncpus=..:ngpus=.., -l walltime=HH:MM:SS, -l filesystems=a:b, -l place=...,
and the same as #PBS lines in the script), anything else is refused as qsub refuses it.

- A job whose select asks for more GPUs than $PBS_STANDIN_NGPUS (default 4) stays queued, with
  the comment PBS's scheduler writes ("Not Running: Insufficient amount of resource: ngpus ...").
- A running job is watched by a runner process that enforces its walltime (SIGTERM, then
  SIGKILL; Exit_status -29) and records the script's exit status (a signal N: 256 + N).
- ``qstat -xf -F json [ids]`` prints {"timestamp", "pbs_version", "pbs_server", "Jobs": {...}};
  an unknown id: "qstat: Unknown Job Id <id>" on stderr and exit status 153.
- ``qdel ids``: a queued job finishes at once; a running one gets SIGTERM (Exit_status 271).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

SERVER = "standin-pbs"
_RESOURCES = {"select", "walltime", "filesystems", "place"}
_SELECT = re.compile(r"^[1-9][0-9]*(:[A-Za-z_][A-Za-z0-9_]*=[^:=\s]+)*$")
_WALLTIME = re.compile(r"^[0-9]+:[0-5][0-9]:[0-5][0-9]$")
_FILESYSTEMS = re.compile(r"^[a-z_][a-z0-9_]*(:[a-z_][a-z0-9_]*)*$")
_PLACE = re.compile(r"^(free|pack|scatter|vscatter)(:(excl|shared|exclhost|group=[a-z]+))*$")


def _root() -> Path:
    root = Path(os.environ["PBS_STANDIN_DIR"])
    (root / "jobs").mkdir(parents=True, exist_ok=True)
    return root


def _path(job_id: str) -> Path:
    return _root() / "jobs" / f"{job_id}.json"


def _load(job_id: str) -> dict | None:
    try:
        return json.loads(_path(job_id).read_text())
    except (OSError, ValueError):
        return None


def _update(job_id: str, **fields) -> dict:
    with open(_root() / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        job = _load(job_id) or {}
        job.update(fields)
        tmp = _path(job_id).with_suffix(".tmp")
        tmp.write_text(json.dumps(job))
        tmp.replace(_path(job_id))
        return job


def _fail(message: str, status: int) -> int:
    print(message, file=sys.stderr)
    return status


def _parse_options(args: list[str], into: dict) -> list[str]:
    """qsub's options; what is left (the script). Raises ValueError with qsub's words."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg == "-":
            return args[i:]
        flag = arg[1:]
        if flag in ("q", "A", "N", "o", "e", "j", "l"):
            if i + 1 >= len(args):
                raise ValueError(f"qsub: option requires an argument -- '{flag}'")
            value = args[i + 1]
            i += 2
            if flag == "l":
                for item in value.split(","):
                    name, _, val = item.partition("=")
                    _check_resource(name, val)
                    into["Resource_List"][name] = val
            elif flag == "j":
                if value not in ("oe", "eo", "n"):
                    raise ValueError(f"qsub: illegal -j value {value}")
                into["Join_Path"] = value
            else:
                into[
                    {
                        "q": "queue",
                        "A": "Account_Name",
                        "N": "Job_Name",
                        "o": "Output_Path",
                        "e": "Error_Path",
                    }[flag]
                ] = value
        else:
            raise ValueError(f"qsub: invalid option -- '{flag}'")
    return []


def _check_resource(name: str, value: str) -> None:
    checks = {"select": _SELECT, "walltime": _WALLTIME, "filesystems": _FILESYSTEMS, "place": _PLACE}
    if name not in _RESOURCES:
        raise ValueError(f"qsub: Unknown resource Resource_List.{name}")
    if not checks[name].match(value):
        raise ValueError(f"qsub: Illegal attribute or resource value Resource_List.{name}")


def _ngpus(select: str) -> int:
    chunks, *parts = select.split(":")
    per = dict(p.split("=", 1) for p in parts)
    return int(chunks) * int(per.get("ngpus", 0))


def qsub(args: list[str]) -> int:
    job: dict = {"Resource_List": {}, "argv": ["qsub", *args]}
    try:
        rest = _parse_options(args, job)
        if len(rest) != 1:
            raise ValueError(
                "usage: qsub [-A account] [-j oe] [-l resource_list] [-N name] [-o path] [-q queue] script"
            )
        script = Path(rest[0])
        directives = [
            line[4:].strip().split() for line in script.read_text().splitlines() if line.startswith("#PBS ")
        ]
        from_script: dict = {"Resource_List": {}}
        for words in directives:
            _parse_options(words, from_script)
    except OSError as exc:
        return _fail(f"qsub: script file:: {exc.strerror}", 2)
    except ValueError as exc:
        return _fail(str(exc), 2)
    resources = {**from_script.pop("Resource_List"), **job["Resource_List"]}
    job = {**from_script, **job, "Resource_List": resources}
    if "select" not in resources:
        resources["select"] = "1"
    resources["nodect"] = int(resources["select"].split(":")[0])
    with open(_root() / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        seq_file = _root() / "seq"
        seq = int(seq_file.read_text()) + 1 if seq_file.exists() else 1
        seq_file.write_text(str(seq))
    job_id = f"{seq}.{SERVER}"
    job.update(
        Job_Name=job.get("Job_Name", script.name), job_state="Q", queue=job.get("queue", "workq"),
        qtime=time.ctime(), script=str(script.resolve()), comment="Job is queued",
    )  # fmt: skip
    available = int(os.environ.get("PBS_STANDIN_NGPUS", "4"))
    wanted = _ngpus(resources["select"])
    if wanted > available:
        job["comment"] = (
            f"Not Running: Insufficient amount of resource: ngpus (R: {wanted} A: {available} T: {available})"
        )
    _path(job_id).write_text(json.dumps(job))
    if wanted <= available:
        subprocess.Popen(
            [sys.executable, __file__, "_run", job_id],
            start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    print(job_id)
    return 0


def _run(job_id: str) -> int:
    """The job's runner: start the script, enforce the walltime, record how it ended."""
    job = _load(job_id)
    if job is None or job["job_state"] != "Q":  # deleted before it could start
        return 0
    out = job.get("Output_Path") or str(Path(job["script"]).with_suffix(f".o{job_id.split('.')[0]}"))
    env = {**os.environ, "PBS_JOBID": job_id, "PBS_JOBNAME": job["Job_Name"], "PBS_QUEUE": job["queue"]}
    with open(out, "ab") as log:
        proc = subprocess.Popen(
            ["/bin/bash", job["script"]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _update(
        job_id, job_state="R", runner_pid=os.getpid(), job_pgid=proc.pid, stime=time.ctime(),
        exec_host="standin-node/0*64", comment=f"Job run at {time.ctime()} on (standin-node:ncpus=64)",
    )  # fmt: skip
    limit = job["Resource_List"].get("walltime")
    deadline = None
    if limit:
        h, m, s = (int(x) for x in limit.split(":"))
        deadline = time.monotonic() + h * 3600 + m * 60 + s
    killed_for_walltime = False
    while proc.poll() is None:
        if deadline is not None and time.monotonic() > deadline and not killed_for_walltime:
            killed_for_walltime = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5  # then SIGKILL
        elif killed_for_walltime and time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)
    code = proc.returncode  # a signal N: -N from Popen, 256 + N in PBS
    status = -29 if killed_for_walltime else (256 - code if code < 0 else code)
    comment = (
        f"job killed: walltime {limit} exceeded limit {limit}"
        if killed_for_walltime
        else "Job run and finished"
    )
    _update(job_id, job_state="F", Exit_status=status, comment=comment, obittime=time.ctime())
    return 0


def qstat(args: list[str]) -> int:
    if args[:3] != ["-xf", "-F", "json"]:
        return _fail("qstat: the stand-in knows only: qstat -xf -F json [job ids]", 2)
    wanted = args[3:]
    ids = wanted or sorted(p.stem for p in (_root() / "jobs").glob("*.json"))
    jobs, status = {}, 0
    for job_id in ids:
        job = _load(job_id)
        if job is None:
            print(f"qstat: Unknown Job Id {job_id}", file=sys.stderr)
            status = 153
            continue
        jobs[job_id] = {k: v for k, v in job.items() if k not in ("argv", "script", "runner_pid", "job_pgid")}
    print(
        json.dumps(
            {
                "timestamp": int(time.time()),
                "pbs_version": "2022.1.1 (stand-in)",
                "pbs_server": SERVER,
                "Jobs": jobs,
            },
            indent=4,
        )
    )
    return status


def qdel(args: list[str]) -> int:
    if not args:
        return _fail("usage: qdel [-W force] job_identifier...", 2)
    status = 0
    for job_id in args:
        job = _load(job_id)
        if job is None:
            print(f"qdel: Unknown Job Id {job_id}", file=sys.stderr)
            status = 153
        elif job["job_state"] == "F":
            print(f"qdel: Job has finished {job_id}", file=sys.stderr)
            status = 35
        elif job["job_state"] == "Q":
            _update(job_id, job_state="F", comment="Job deleted by qdel while queued", obittime=time.ctime())
        else:
            with contextlib.suppress(ProcessLookupError, KeyError):
                os.killpg(job["job_pgid"], signal.SIGTERM)
    return status


def main() -> int:
    command, args = sys.argv[1], sys.argv[2:]
    return {"qsub": qsub, "qstat": qstat, "qdel": qdel, "_run": lambda a: _run(a[0])}[command](args)


if __name__ == "__main__":
    sys.exit(main())
