"""The local provider: a node is one ``first worker`` child process per worker on this machine.

The processes are detached (a session of their own, no death signal): a scaler that dies leaves
them serving, and the next scaler adopts them by the process ids its node table kept (the node's
``job_id``: ``pid,pid,...``). Only an orderly stop of the stack (``close``) ends them. Where no
next scaler could reach them (``first up`` on a throwaway embedded NATS server) they die with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from services.scaler.providers.base import NodeProvider, NodeSpec
from shared import schema
from shared.children import child_process_options, detached_process_options


@dataclass
class _Worker:
    """One worker process: started here (``proc``) or adopted from an earlier scaler (``pid`` only)."""

    worker_id: str
    pid: int
    proc: asyncio.subprocess.Process | None = None

    def exit_code(self) -> int | None:
        """None while it runs; its status once it ended (-1: an adopted process, status unknown)."""
        if self.proc is not None:
            return self.proc.returncode
        return None if _alive(self.pid, self.worker_id) else -1

    def signal(self, sig: signal.Signals) -> None:
        if self.exit_code() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


@dataclass
class _Node:
    spec: NodeSpec
    workers: list[_Worker] = field(default_factory=list)
    stopping: bool = False


def _alive(pid: int, worker_id: str) -> bool:
    """The process runs (not a zombie) and is the worker we think (pids are reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
        return False
    return worker_id.encode() in cmdline


class LocalProvider(NodeProvider):
    name = "local"

    def __init__(
        self,
        config_path: str,
        nats_url: str,
        *,
        stop_timeout_s: float = 330.0,
        credentials_dir: str = "",
        poll_interval_s: float = 0.05,
        detach: bool = True,
    ):
        self.config_path = config_path
        self.nats_url = nats_url
        self.stop_timeout_s = stop_timeout_s
        self.credentials_dir = credentials_dir  # each worker's NATS seed: <dir>/<worker id>.nk
        self.poll_interval_s = poll_interval_s
        # False: the workers die with the scaler (SIGTERM), where no successor could adopt them.
        self.detach = detach
        self._nodes: dict[str, _Node] = {}
        self._host = socket.gethostname()
        self._log = structlog.get_logger().bind(service="scaler", provider=self.name)

    def command(self, spec: NodeSpec, worker_id: str) -> list[str]:
        argv = [
            sys.executable, "-m", "services.cli", "worker",
            "--config", self.config_path,
            "--nats", self.nats_url,
            "--cluster", spec.cluster,
            "--model", spec.model,
            "--worker-id", worker_id,
            "--node-id", spec.node_id,
        ]  # fmt: skip
        if spec.walltime_s is not None:
            argv += ["--walltime", f"{spec.walltime_s:g}"]
        if self.credentials_dir:
            argv += ["--credentials", str(Path(self.credentials_dir) / f"{worker_id}.nk")]
        return argv

    async def start_node(self, spec: NodeSpec) -> None:
        node = self._nodes[spec.node_id] = _Node(spec)
        for worker_id in spec.worker_ids:
            # stdout/stderr are inherited: the workers' log lines join the stack's.
            proc = await asyncio.create_subprocess_exec(
                *self.command(spec, worker_id),
                stdin=asyncio.subprocess.DEVNULL,
                **(detached_process_options() if self.detach else child_process_options()),
            )
            node.workers.append(_Worker(worker_id, proc.pid, proc))
            self._log.info("node_process_started", node_id=spec.node_id, worker_id=worker_id, pid=proc.pid)

    async def adopt(self, spec: NodeSpec, job_id: str) -> bool:
        try:
            pids = [int(p) for p in job_id.split(",") if p]
        except ValueError:
            return False
        if len(pids) != len(spec.worker_ids):
            return False
        node = _Node(spec, [_Worker(w, pid) for w, pid in zip(spec.worker_ids, pids, strict=True)])
        self._nodes[spec.node_id] = node
        self._log.info("node_adopted", node_id=spec.node_id, pids=pids)
        return True

    async def forget(self) -> None:
        self._nodes.clear()

    async def stop_node(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is not None and not node.stopping:
            node.stopping = True
            for w in node.workers:
                w.signal(signal.SIGTERM)  # the worker drains, then exits

    async def poll(self) -> dict[str, tuple[schema.NodeState, str]]:
        states: dict[str, tuple[schema.NodeState, str]] = {}
        for node_id, node in list(self._nodes.items()):
            codes = [w.exit_code() for w in node.workers]
            if any(code is None for code in codes):
                states[node_id] = ("stopping" if node.stopping else "running", "")
                continue
            failed = [(w, c) for w, c in zip(node.workers, codes, strict=True) if c not in (0, -1)]
            if node.stopping or not failed:
                states[node_id] = ("stopped", "")
            else:
                w, code = failed[0]
                states[node_id] = ("failed", f"worker {w.worker_id} exited with status {code}")
            del self._nodes[node_id]  # reported once, then forgotten
        return states

    def details(self) -> dict[str, dict]:
        return {
            node_id: {
                "job_id": ",".join(str(w.pid) for w in node.workers),
                "job_state": "stopping" if node.stopping else "running",
                "host": self._host,
                "nodes_reserved": 1,
            }
            for node_id, node in self._nodes.items()
        }

    async def close(self) -> None:
        for node_id in list(self._nodes):
            await self.stop_node(node_id)
        workers = [w for node in self._nodes.values() for w in node.workers]
        deadline = time.monotonic() + self.stop_timeout_s
        # Adopted workers are not our children: nothing to wait on but their /proc entries.
        while any(w.exit_code() is None for w in workers) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(self.poll_interval_s)
        for w in workers:
            w.signal(signal.SIGKILL)
            if w.proc is not None:
                await w.proc.wait()
        self._nodes.clear()
