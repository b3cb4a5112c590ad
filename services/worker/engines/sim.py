"""The simulator: an in-process engine for tests and benchmarks.

It behaves like a serving engine where it matters to the stack: a time to first token, a time
between tokens, a concurrency limit with queueing beyond it, and exact token counts. Its text is
deterministic: the same prompt and seed give the same words. One token is one word of its
vocabulary; a prompt counts one token per whitespace-separated word.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from services.worker.engines.base import Batch, Engine, max_tokens, prompt_text
from shared import config as cfg
from shared import schema, vectors

VOCABULARY = (
    "the cluster answers every request with tokens streamed over nats from a node that woke up "
    "when the queue grew and sleeps again once the researchers go home for the night"
).split()


def simulated_words(prompt: str, seed: int | None, n: int) -> list[str]:
    digest = hashlib.blake2b(f"{seed}|{prompt}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "big"))
    return [rng.choice(VOCABULARY) for _ in range(n)]


def natural_length(prompt: str, seed: int | None) -> int:
    """Where the simulated answer would stop by itself (8 to 31 tokens)."""
    digest = hashlib.blake2b(f"len|{seed}|{prompt}".encode(), digest_size=2).digest()
    return 8 + int.from_bytes(digest, "big") % 24


class PrefixCache:
    """An engine's prefix cache, as vLLM keeps it: prompts in blocks of BLOCK tokens, each block
    known by the hash of everything up to its end, the least recently used dropped first."""

    BLOCK = 16

    def __init__(self, tokens: int):
        self.blocks = tokens // self.BLOCK
        self._known: OrderedDict[bytes, None] = OrderedDict()
        self.computed = self.reused = 0  # prompt tokens so far, computed anew or found cached

    def prefill(self, words: list[str]) -> int:
        """Take in a prompt; how many of its tokens were not cached (all of them, without a cache)."""
        if not self.blocks:
            self.computed += len(words)
            return len(words)
        digest, cached, missed = hashlib.blake2b(digest_size=16), 0, False
        for end in range(self.BLOCK, len(words) + 1, self.BLOCK):
            digest.update(" ".join(words[end - self.BLOCK : end]).encode() + b"\n")
            key = digest.copy().digest()
            if not missed and key in self._known:
                cached = end
                self._known.move_to_end(key)
            else:
                missed = True
                self._known[key] = None
                if len(self._known) > self.blocks:
                    self._known.popitem(last=False)
        self.computed += len(words) - cached
        self.reused += cached
        return len(words) - cached


class SimulatedEngine(Engine):
    name = "sim"

    def __init__(self, settings: cfg.SimEngine):
        self.settings = settings
        self.prefix_cache = PrefixCache(settings.prefix_cache_tokens)
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._running = 0
        self._waiting = 0

    async def start(self) -> None:
        if self.settings.load_s:
            await asyncio.sleep(self.settings.load_s)

    async def stop(self) -> None:
        pass

    async def load(self) -> schema.EngineLoad:
        return schema.EngineLoad(running=self._running, waiting=self._waiting)

    async def count_prompt_tokens(self, endpoint: schema.Endpoint, body: dict[str, Any]) -> int:
        return max(1, len(prompt_text(endpoint, body).split()))

    async def generate(
        self, endpoint: schema.Endpoint, body: dict[str, Any], *, stream: bool = True
    ) -> AsyncIterator[Batch]:
        s = self.settings
        prompt = prompt_text(endpoint, body)
        seed = body.get("seed") if isinstance(body.get("seed"), int) else None
        limit = max_tokens(body, s.default_max_tokens)
        natural = natural_length(prompt, seed)
        n = min(limit, natural)
        words = simulated_words(prompt, seed, n)
        stop = body.get("stop")
        stops = (
            [stop]
            if isinstance(stop, str)
            else [w for w in stop if isinstance(w, str)]
            if isinstance(stop, list)
            else []
        )
        finish = "length" if limit < natural else "stop"

        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        try:
            uncached = self.prefix_cache.prefill(prompt.split())
            await asyncio.sleep((s.ttft_ms + s.prefill_ms_per_token * uncached) / 1000)
            produced = 0
            for i, word in enumerate(words):
                if word in stops:
                    finish = "stop"
                    break
                if i:
                    await asyncio.sleep(s.itl_ms / 1000)
                produced += 1
                last = produced == n
                delta = schema.Delta(
                    text=word if i == 0 else " " + word, finish_reason=finish if last else None
                )
                yield Batch([delta], tokens=1)
            else:
                finish = None  # already sent with the last token
            usage = schema.Usage(prompt_tokens=max(1, len(prompt.split())), completion_tokens=produced)
            ending = [schema.Delta(text="", finish_reason=finish)] if finish is not None else []
            yield Batch(ending, usage=usage)
        finally:
            self._running -= 1
            self._slots.release()

    async def embed(self, body: dict[str, Any]) -> tuple[list[bytes], schema.Usage]:
        """A deterministic unit vector per input (the same text, the same vector), after ttft_ms."""
        items = vectors.inputs(body)
        await asyncio.sleep(self.settings.ttft_ms / 1000)
        out, tokens = [], 0
        for item in items:
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += max(1, len(text.split()))
            digest = hashlib.blake2b(f"embed|{text}".encode(), digest_size=8).digest()
            rng = random.Random(int.from_bytes(digest, "big"))
            values = [rng.gauss(0.0, 1.0) for _ in range(self.settings.embedding_dims)]
            norm = sum(v * v for v in values) ** 0.5 or 1.0
            out.append(vectors.pack([v / norm for v in values]))
        return out, schema.Usage(prompt_tokens=tokens)
