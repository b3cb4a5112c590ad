"""The node-provider interface.

Designed for providers whose nodes arrive minutes after they are asked for, and may never arrive:
``start_node`` only submits (a batch job, a Globus Compute task, a process) and returns at once;
``poll`` reports each node's state as the provider sees it (``requested`` while the batch system
holds it, ``running`` once it runs, ``failed`` or ``stopped`` at the end). Whether the workers on a
running node are ready is learnt from their heartbeats, not from the provider.

A node runs one or more workers (``NodeSpec.workers``: the NATS worker slots the scaler gave it,
e.g. four one-GPU vLLMs on a 4-GPU node); the node id is not a worker id. Before ``stop_node`` the
scaler has already asked each of the node's workers to drain over NATS (their control subject):
a provider waits its grace period for them to exit, then ends the job its own way (scancel, qdel).

The scaler keeps its node table in JetStream KV, so a restarted or standby scaler takes over the
nodes of the one before: ``details()[node_id]["job_id"]`` is stored there, and ``adopt`` hands a
node back to a fresh provider with that job id.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from shared import schema


@dataclass(frozen=True, slots=True)
class NodeSpec:
    node_id: str  # the scaler's name for the node (a subject token); not a worker id
    model: str
    cluster: str
    workers: tuple[str, ...] = ()  # its workers' ids: NATS worker slots <cluster>-n<i>
    walltime_s: float | None = None  # the job's time limit; its workers drain before it ends

    @property
    def worker_ids(self) -> tuple[str, ...]:
        """The node's workers; a spec without any names one worker after the node."""
        return self.workers or (self.node_id,)


class NodeProvider(abc.ABC):
    name = "provider"

    @abc.abstractmethod
    async def start_node(self, spec: NodeSpec) -> None:
        """Submit a request for a node running ``first worker`` for each of the spec's workers.
        Returns without waiting. Raises if the submission failed (the scaler backs off)."""

    @abc.abstractmethod
    async def stop_node(self, node_id: str) -> None:
        """Release the node (its workers were asked to drain). Returns without waiting."""

    @abc.abstractmethod
    async def poll(self) -> dict[str, tuple[schema.NodeState, str]]:
        """Each known node's state and, for failures, why. Nodes that ended are reported once more."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every node this provider started (the stack is shutting down in order)."""

    def details(self) -> dict[str, dict]:
        """What the provider knows of each node, for /jobs and ``first status``, by node id: any of
        ``job_id``, ``job_state``, ``host``, ``nodes_reserved``, ``walltime`` (s),
        ``estimated_start`` (unix s), ``reason``. ``job_id`` is what ``adopt`` takes back."""
        return {}

    async def adopt(self, spec: NodeSpec, job_id: str) -> bool:
        """Track a node that another scaler (an earlier run of this one) started, from the job id
        its ``details`` gave. False: this provider cannot (the scaler drains its workers)."""
        return False

    async def forget(self) -> None:  # noqa: B027 (optional: a provider that tracks nothing)
        """Stop tracking every node without stopping any (this scaler hands over to another)."""
