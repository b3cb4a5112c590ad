"""What the worker needs from an engine: start, stop, report load, and generate a stream of tokens."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from shared import errors, schema


@dataclass(slots=True)
class Batch:
    """What an engine had ready at once (one token of a slow engine; dozens from one network
    read of a fast one): the text per choice, how many tokens it holds, and, in the last batch
    only, the engine's usage."""

    deltas: list[schema.Delta] = field(default_factory=list)  # at most one per choice
    tokens: int = 0
    usage: schema.Usage | None = None


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
    def generate(
        self, endpoint: schema.Endpoint, body: dict[str, Any], *, stream: bool = True
    ) -> AsyncIterator[Batch]:
        """Run one request; ``body`` is the client's OpenAI request. Yields Batches as the engine
        produces text; the last one carries the Usage. With ``stream=False`` the engine may
        produce the whole answer at once. Raises shared.errors on failure."""

    async def count_prompt_tokens(self, endpoint: schema.Endpoint, body: dict[str, Any]) -> int:
        """The prompt's token count, for runs that end before the engine reported usage. 0: unknown."""
        return 0

    async def embed(self, body: dict[str, Any]) -> tuple[list[bytes], schema.Usage]:
        """One vector per input of an embeddings request (float32 little-endian bytes), and the usage."""
        raise errors.BadRequest(f"The {self.name} engine of this model serves no embeddings.", param="model")


def prompt_text(endpoint: schema.Endpoint, body: dict[str, Any]) -> str:
    """The prompt as plain text: the completion prompt, or the chat messages' text joined.

    Tolerant of any shape: NATS-native callers' bodies are not checked by the gateway.
    """
    if endpoint == "completion":
        prompt = body.get("prompt", "")
        if isinstance(prompt, str):
            return prompt
        return " ".join(p for p in prompt if isinstance(p, str)) if isinstance(prompt, list) else ""
    parts: list[str] = []
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


def max_tokens(body: dict[str, Any], default: int) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if isinstance(value, int) and value > 0 else default
