"""A real single-node Slurm for tests: munged, slurmctld and slurmd from Debian's packages.

Started without systemd, every file under one temporary folder: its own munge key and socket, its
own slurm.conf (commands find it through ``SLURM_CONF``), free ports, state and spool folders; the
daemons run in the foreground as children of the test process and are ended at teardown (running
jobs are cancelled first: stopping slurmd does not end them). The recipe is
../shared/reference/slurm.md. ``tools/sysdeps`` installs the packages; where they are missing or a
daemon cannot start, the fixture skips with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import free_port

_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sacct", "scontrol")


def _slurm_conf(tmp: Path, host: str, hardware: str, munge_socket: Path) -> str:
    return f"""\
ClusterName=firsttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={tmp}/jobcomp.log
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
{hardware} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """One Slurm controller and one compute node on this machine; ``env`` is what Slurm's
    commands need (``SLURM_CONF``)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.conf = tmp / "slurm.conf"
        # The daemons live in /usr/sbin, which a CI job's PATH may lack.
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}
        self._procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 30.0) -> None:
        missing = [c for c in _COMMANDS if shutil.which(c, path=self.env["PATH"]) is None]
        if missing:
            raise RuntimeError(f"Slurm is not installed (no {', '.join(missing)}; run tools/sysdeps)")
        if os.geteuid() != 0:
            raise RuntimeError("starting slurmctld and slurmd needs root")
        munge = pwd.getpwnam("munge")
        for sub in ("state", "spool", "munge"):
            (self.tmp / sub).mkdir(mode=0o755)
        self.tmp.chmod(0o755)  # munged checks every folder above its socket
        munge_dir = self.tmp / "munge"
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        munge_socket = munge_dir / "munge.socket"
        self._spawn(
            "munged", "--foreground", f"--key-file={key}", f"--socket={munge_socket}",
            f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
            f"--seed-file={munge_dir}/munged.seed",
            user="munge",
        )  # fmt: skip
        self._wait(lambda: munge_socket.exists(), "munged's socket", timeout)
        host = socket.gethostname().split(".")[0]
        hardware = subprocess.run(
            ["slurmd", "-C"], env=self.env, capture_output=True, text=True, check=True, timeout=10
        ).stdout.splitlines()[0]
        self.conf.write_text(_slurm_conf(self.tmp, host, hardware, munge_socket))
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._wait(
            lambda: self.run("scontrol", "ping").returncode == 0 and "UP" in self.last_stdout,
            "slurmctld",
            timeout,
        )
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", host)
        self._wait(self._node_idle, "the node to be idle", timeout)

    def _spawn(self, *argv: str, user: str = "") -> None:
        argv = (shutil.which(argv[0], path=self.env["PATH"]) or argv[0], *argv[1:])
        if user:
            argv = ("runuser", "-u", user, "--", *argv)
        name = Path(argv[4] if user else argv[0]).name
        log = (self.tmp / f"{name}.out").open("ab")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self._procs.append(proc)

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=10)
        self.last_stdout = result.stdout
        return result

    def _node_idle(self) -> bool:
        return "idle" in self.run("sinfo", "--noheader", "--format=%t").stdout

    def _wait(self, probe, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            dead = [p for p in self._procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"Slurm did not start ({what}): {self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 15) -> str:
        tails = []
        for log in sorted(self.tmp.glob("*.log")) + sorted(self.tmp.glob("*.out")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(tails)

    def squeue(self) -> str:
        return self.run("squeue", "--noheader", "--format=%i %T %r").stdout

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.run("scancel", "--full", "--user=root")
            deadline = time.monotonic() + 10
            while self.run("squeue", "--noheader", "--states=running,completing").stdout.strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def slurm():
    """A running single-node Slurm, or a skip that says why there is none. Its folder is not under
    pytest's (mode 0700 there): munged, running as munge, must reach its socket."""
    tmp = Path(tempfile.mkdtemp(prefix="first-slurm-"))
    cluster = SlurmCluster(tmp)
    try:
        cluster.start()
    except (RuntimeError, OSError, KeyError, subprocess.SubprocessError) as exc:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"no real Slurm here: {exc}")
    yield cluster
    cluster.stop()
    shutil.rmtree(tmp, ignore_errors=True)


async def wait_gone(cluster: SlurmCluster, timeout: float = 10.0) -> None:
    """Until no job of ``cluster`` is pending or running."""
    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(
        lambda: cluster.run("squeue", "--noheader", "--states=pending,running").stdout.strip()
    ):
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs still there: {cluster.squeue()}")
        await asyncio.sleep(0.1)
