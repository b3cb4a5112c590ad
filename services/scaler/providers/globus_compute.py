"""The Globus Compute provider: a node is one task on a site's Globus Compute endpoint.

This is how FIRST reaches PBS nodes without SSH: the endpoint (its YAML, docs/providers.md) gets
a node from its own provider and runs ``run_node`` there, which runs the node's workers (the same
block a batch script has) and returns when they exit. The scaler talks to the endpoint only
through ``globus_compute_sdk.Executor``; that SDK is synchronous, so every call goes through a
thread. A task cannot be signalled: the scaler releases a node by asking its workers to drain
over NATS (their control subject), and the task returns when they have exited. A task not yet
handed to the endpoint is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from services.scaler.providers import batch_script
from services.scaler.providers.base import NodeProvider, NodeSpec
from shared import schema
from shared.provider_config import GlobusComputeSettings

_NODE_SCRIPT = """\
#!/bin/bash
# FIRST node {{node_id}}: {{model}} on cluster {{cluster}}, a Globus Compute task of the FIRST scaler.
set -u
{{setup}}
{{workers}}
"""


def run_node(script: str, output_lines: int = 40) -> dict:
    """Runs on the node, inside the endpoint's worker: the node's workers, until they exit.

    Self-contained (the endpoint unpickles it by value): the script starts each worker and waits
    for all of them. Returns the exit status and the output's last lines, which the scaler shows
    when a node fails.
    """
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="first-node-") as log:
        proc = subprocess.run(["/bin/bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, check=False)
        log.seek(0)
        tail = log.read().splitlines()[-output_lines:]
    return {"exit_status": proc.returncode, "output": "\n".join(tail)}


def default_executor(settings: GlobusComputeSettings):
    """A Globus Compute SDK Executor for the endpoint (blocking: call it in a thread)."""
    from globus_compute_sdk import Client, Executor

    client = None
    if settings.client_credentials_file:
        import globus_sdk

        client_id, secret = Path(settings.client_credentials_file).read_text().split()[:2]
        client = Client(app=globus_sdk.ClientApp("first-scaler", client_id=client_id, client_secret=secret))
    return Executor(
        endpoint_id=settings.endpoint_id,
        client=client,
        user_endpoint_config=dict(settings.endpoint_config) or None,
        label="first-scaler",
    )


@dataclass
class _Task:
    spec: NodeSpec
    future: Any  # a ComputeFuture (a concurrent.futures.Future with .task_id)
    stopping: bool = False


class GlobusComputeProvider(NodeProvider):
    name = "globus_compute"

    def __init__(
        self,
        settings: GlobusComputeSettings,
        *,
        config_path: str,
        nats_url: str,
        credentials_dir: str = "",
        executor_factory: Callable[[GlobusComputeSettings], Any] = default_executor,
    ):
        self.settings = settings
        self.command = batch_script.NodeCommand.of(
            settings, config_path=config_path, nats_url=nats_url, credentials_dir=credentials_dir
        )
        self._executor_factory = executor_factory
        self._executor = None
        self._tasks: dict[str, _Task] = {}
        self._log = structlog.get_logger().bind(service="scaler", provider=self.name)

    def script(self, spec: NodeSpec) -> str:
        return batch_script.render(
            _NODE_SCRIPT,
            spec,
            self.command,
            self.settings,
            directives=[],
            job_name=batch_script.job_name(spec),
        )

    async def _get_executor(self):
        if self._executor is None:
            self._executor = await asyncio.to_thread(self._executor_factory, self.settings)
        return self._executor

    async def start_node(self, spec: NodeSpec) -> None:
        executor = await self._get_executor()  # raises (no login, SDK missing): the scaler backs off
        future = await asyncio.to_thread(executor.submit, run_node, self.script(spec))
        self._tasks[spec.node_id] = _Task(spec, future)
        self._log.info("node_task_submitted", node_id=spec.node_id, endpoint_id=self.settings.endpoint_id)

    async def stop_node(self, node_id: str) -> None:
        task = self._tasks.get(node_id)
        if task is None or task.stopping:
            return
        task.stopping = True  # its workers were asked to drain; the task returns when they exit
        if not getattr(task.future, "task_id", None):
            task.future.cancel()  # not yet with the endpoint

    async def poll(self) -> dict[str, tuple[schema.NodeState, str]]:
        states: dict[str, tuple[schema.NodeState, str]] = {}
        for node_id, task in list(self._tasks.items()):
            if not task.future.done():
                task_id = getattr(task.future, "task_id", None)
                waiting = (
                    f"task {task_id} at endpoint {self.settings.endpoint_id}" if task_id else "submitting"
                )
                states[node_id] = ("stopping" if task.stopping else "requested", waiting)
                continue
            states[node_id] = self._ended(task)
            del self._tasks[node_id]  # reported once, then forgotten
        return states

    def _ended(self, task: _Task) -> tuple[schema.NodeState, str]:
        if task.future.cancelled():
            return "stopped", "cancelled before the endpoint ran it"
        exc = task.future.exception()
        if exc is not None:
            return "failed", f"the task failed: {type(exc).__name__}: {str(exc)[:400]}"
        result = task.future.result()
        code = result.get("exit_status") if isinstance(result, dict) else None
        if code == 0 or task.stopping:
            return "stopped", "the node's workers exited"
        output = (result.get("output") or "").strip().splitlines()[-3:] if isinstance(result, dict) else []
        return "failed", f"the node's workers exited with status {code}" + (
            ": " + " | ".join(output) if output else ""
        )

    def details(self) -> dict[str, dict]:
        return {
            node_id: {
                "job_id": getattr(task.future, "task_id", None) or "",
                "job_state": "stopping" if task.stopping else "submitted",
                "endpoint_id": self.settings.endpoint_id,
            }
            for node_id, task in self._tasks.items()
        }

    async def forget(self) -> None:
        self._tasks.clear()

    async def close(self) -> None:
        """The workers were asked to drain (orderly shutdown); tasks not yet sent are cancelled."""
        for task in self._tasks.values():
            if not getattr(task.future, "task_id", None):
                task.future.cancel()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(executor.shutdown, wait=False, cancel_futures=True)
