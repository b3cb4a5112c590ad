"""The node-provider interface.

Designed for providers whose nodes arrive minutes after they are asked for, and may never arrive:
``start_node`` only submits (a batch job, a Globus Compute task, a process) and returns at once;
``poll`` reports each node's state as the provider sees it (``requested`` while the batch system
holds it, ``running`` once it runs, ``failed`` or ``stopped`` at the end). Whether the worker on a
running node is ready is learnt from its heartbeats, not from the provider.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from shared import schema


@dataclass(frozen=True, slots=True)
class NodeSpec:
    node_id: str  # also the worker id, so heartbeats map back to the node
    model: str
    cluster: str


class NodeProvider(abc.ABC):
    name = "provider"

    @abc.abstractmethod
    async def start_node(self, spec: NodeSpec) -> None:
        """Submit a request for a node running ``first worker`` for the spec. Returns without waiting."""

    @abc.abstractmethod
    async def stop_node(self, node_id: str) -> None:
        """Ask the node to drain and release itself. Returns without waiting."""

    @abc.abstractmethod
    async def poll(self) -> dict[str, tuple[schema.NodeState, str]]:
        """Each known node's state and, for failures, why. Nodes that ended are reported once more."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every node this provider started (the stack is shutting down)."""
