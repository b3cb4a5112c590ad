"""CPU time from /proc: of a process and its descendants, and of the whole machine.

Linux only. Reads are small and fast, but they are still file reads: call them through
``asyncio.to_thread`` from an event loop.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    ppid: int
    name: str  # comm, e.g. python or nats-server
    cpu_s: float  # utime + stime
    sys_s: float  # stime: in the kernel (syscalls, and on loopback TCP the receiver's side too)


def _read(pid: str) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # gone meanwhile
        return None
    # The name sits in parentheses and may itself hold spaces and parentheses: split after the last.
    close = stat.rfind(b")")
    name = stat[stat.find(b"(") + 1 : close].decode(errors="replace")
    fields = stat[close + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return Proc(int(pid), int(fields[1]), name, (utime + stime) / _TICK, stime / _TICK)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def tree(root: int) -> list[Proc]:
    """``root`` and every process below it, as they are now."""
    procs = [p for pid in os.listdir("/proc") if pid.isdigit() and (p := _read(pid)) is not None]
    children: dict[int, list[Proc]] = defaultdict(list)
    by_pid = {}
    for p in procs:
        children[p.ppid].append(p)
        by_pid[p.pid] = p
    if root not in by_pid:
        return []
    out, todo = [], [by_pid[root]]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children[p.pid])
    return out


def process_cpu(pid: int) -> float:
    p = _read(str(pid))
    return 0.0 if p is None else p.cpu_s


def machine_busy_s() -> tuple[float, float]:
    """CPU seconds the machine has spent busy (all cores; user, system, interrupts), and those the
    hypervisor gave to other machines (steal)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK
