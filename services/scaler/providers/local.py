"""The local provider: worker nodes are ``first worker`` child processes on this machine."""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

from services.scaler.providers.base import NodeProvider, NodeSpec
from shared import schema
from shared.children import child_process_options


@dataclass
class _Proc:
    spec: NodeSpec
    proc: asyncio.subprocess.Process
    stopping: bool = False
    reported_end: bool = False


class LocalProvider(NodeProvider):
    name = "local"

    def __init__(
        self, config_path: str, nats_url: str, *, stop_timeout_s: float = 330.0, credentials_dir: str = ""
    ):
        self.config_path = config_path
        self.nats_url = nats_url
        self.stop_timeout_s = stop_timeout_s
        self.credentials_dir = credentials_dir  # each node's NATS seed: <dir>/<node id>.nk
        self._procs: dict[str, _Proc] = {}
        self._log = structlog.get_logger().bind(service="scaler", provider=self.name)

    def command(self, spec: NodeSpec) -> list[str]:
        argv = [
            sys.executable, "-m", "services.cli", "worker",
            "--config", self.config_path,
            "--nats", self.nats_url,
            "--cluster", spec.cluster,
            "--model", spec.model,
            "--worker-id", spec.node_id,
            "--node-id", spec.node_id,
        ]  # fmt: skip
        if self.credentials_dir:
            argv += ["--credentials", str(Path(self.credentials_dir) / f"{spec.node_id}.nk")]
        return argv

    async def start_node(self, spec: NodeSpec) -> None:
        # stdout/stderr are inherited: the worker's log lines join the stack's.
        proc = await asyncio.create_subprocess_exec(
            *self.command(spec), stdin=asyncio.subprocess.DEVNULL, **child_process_options()
        )
        self._procs[spec.node_id] = _Proc(spec, proc)
        self._log.info("node_process_started", node_id=spec.node_id, pid=proc.pid)

    async def stop_node(self, node_id: str) -> None:
        p = self._procs.get(node_id)
        if p is not None and p.proc.returncode is None and not p.stopping:
            p.stopping = True
            p.proc.send_signal(signal.SIGTERM)  # the worker drains, then exits

    async def poll(self) -> dict[str, tuple[schema.NodeState, str]]:
        states: dict[str, tuple[schema.NodeState, str]] = {}
        for node_id, p in list(self._procs.items()):
            code = p.proc.returncode
            if code is None:
                states[node_id] = ("stopping" if p.stopping else "running", "")
                continue
            if p.stopping or code == 0:
                states[node_id] = ("stopped", "")
            else:
                states[node_id] = ("failed", f"worker process exited with status {code}")
            del self._procs[node_id]  # reported once, then forgotten
        return states

    async def close(self) -> None:
        for node_id in list(self._procs):
            await self.stop_node(node_id)
        procs = [p.proc for p in self._procs.values()]
        if not procs:
            return
        await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=self.stop_timeout_s)
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        self._procs.clear()
