"""Sample a running Python process with py-spy and summarise where its time goes, by function."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

_LINE_NO = re.compile(r":\d+\)$")


def executable() -> str:
    """py-spy beside this interpreter (the ``bench`` extra installs it), else on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
    return found


async def record(pid: int, seconds: float, out: Path, rate: int = 200) -> None:
    """Raw (folded) stacks of ``pid`` for ``seconds`` into ``out``. ``--nonblocking`` leaves the
    process running while it is read, so the profile does not slow it down much."""
    proc = await asyncio.create_subprocess_exec(
        executable(), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
        "--nonblocking", "--format", "raw", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"py-spy failed on pid {pid}: {err.decode(errors='replace')[-500:]}")


def _function(frame: str) -> str:
    return _LINE_NO.sub(")", frame.strip())


def summarise(raw: str, top: int = 15, expected: int = 0) -> str:
    """The ``top`` functions by own time (the frame on top of the stack), then by total time.
    ``expected``: the samples of a thread busy all the time (rate x seconds); idle ones are not kept."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";")]
        samples += n
        own[frames[-1]] += n
        for name in set(frames):
            total[name] += n
    if not samples:
        return "no samples\n"
    busy = f" (busy {100 * samples / expected:.0f}% of the time)" if expected else ""
    lines = [f"{samples} samples{busy}", "", f"{'own %':>6} {'total %':>7}  function (file)"]
    lines += [
        f"{100 * n / samples:6.1f} {100 * total[f] / samples:7.1f}  {f}" for f, n in own.most_common(top)
    ]
    lines += ["", f"{'total %':>7}  function (file), by total time"]
    lines += [f"{100 * n / samples:7.1f}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines) + "\n"
