"""What the worker needs from an engine: start, stop, report load, and generate a stream of tokens."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Any

from shared import schema

# What ``generate`` yields: text deltas as the engine makes them, then exactly one Usage at the end.
Event = schema.Delta | schema.Usage


class Engine(abc.ABC):
    name = "engine"

    @abc.abstractmethod
    async def start(self) -> None:
        """Launch or attach, and return once the engine answers its health check. Raises on failure."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release the engine; idempotent."""

    async def load(self) -> schema.EngineLoad:
        """The engine's own queue figures, where it reports them."""
        return schema.EngineLoad()

    @abc.abstractmethod
    def generate(self, endpoint: schema.Endpoint, body: dict[str, Any]) -> AsyncIterator[Event]:
        """Stream one request. ``body`` is the client's OpenAI request. Raises shared.errors on failure."""


def prompt_text(endpoint: schema.Endpoint, body: dict[str, Any]) -> str:
    """The prompt as plain text: the completion prompt, or the chat messages' text joined."""
    if endpoint == "completion":
        prompt = body.get("prompt", "")
        return prompt if isinstance(prompt, str) else " ".join(p for p in prompt if isinstance(p, str))
    parts: list[str] = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(parts)


def max_tokens(body: dict[str, Any], default: int) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if isinstance(value, int) and value > 0 else default
