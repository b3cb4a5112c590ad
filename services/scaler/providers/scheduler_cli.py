"""Running a batch scheduler's commands (sbatch, squeue, qsub, qstat...) from the event loop.

Every call is an asyncio subprocess with a deadline: a scheduler that hangs (slurmctld busy, a PBS
server failing over) costs the caller ``timeout_s``, never the event loop, and the command is
killed. A command that fails raises ``SchedulerError`` carrying its stderr, which is what the
operator needs to see (``sbatch: error: Invalid account or account/partition combination``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import Mapping, Sequence


class SchedulerError(Exception):
    """A scheduler command failed, timed out or could not be run; the message says which and why."""

    def __init__(self, argv: Sequence[str], message: str, *, returncode: int | None = None, stderr: str = ""):
        super().__init__(f"{shlex.join(argv[:1])}: {message}")
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr


def _last_lines(text: str, lines: int = 5, chars: int = 800) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


async def run(
    argv: Sequence[str],
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> tuple[int, str, str]:
    """Run ``argv``; its exit status, stdout and stderr. ``check``: a non-zero status raises."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
    except OSError as exc:
        raise SchedulerError(argv, f"cannot run: {exc.strerror or exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except (TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise SchedulerError(argv, f"no answer within {timeout_s:g} s (killed)") from None
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if check and proc.returncode != 0:
        raise SchedulerError(
            argv,
            f"exited with status {proc.returncode}: {_last_lines(stderr) or _last_lines(stdout) or '(no output)'}",
            returncode=proc.returncode,
            stderr=stderr,
        )
    return proc.returncode, stdout, stderr
