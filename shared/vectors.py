"""Embedding vectors as the wire carries them: float32 little-endian bytes (schema.Embedding)."""

from __future__ import annotations

import math
import sys
from array import array
from typing import Any

from shared import errors

MAX_INPUTS = 2048  # OpenAI's own limit on one request's inputs


def inputs(body: dict[str, Any]) -> list[str | list[int]]:
    """An embeddings request's inputs: a string, a list of strings, a list of token ids, or a list
    of such lists, none empty. NATS-native callers' bodies are unchecked: refuse anything else."""
    raw = body.get("input")
    items = [raw] if isinstance(raw, str) or (isinstance(raw, list) and raw and _tokens(raw)) else raw
    if not isinstance(items, list) or not items or not all(_text(i) or _tokens(i) for i in items):
        raise errors.BadRequest(
            "'input' must be a non-empty string, a list of them, or token ids (a list of integers,"
            " or a list of such lists)",
            param="input",
        )
    if len(items) > MAX_INPUTS:
        raise errors.BadRequest(f"at most {MAX_INPUTS} inputs per request", param="input")
    return items


def _text(item: Any) -> bool:
    return isinstance(item, str) and item != ""


def _tokens(item: Any) -> bool:
    return isinstance(item, list) and bool(item) and all(type(t) is int for t in item)


def pack(values: list[float]) -> bytes:
    vector = array("f", values)
    if sys.byteorder != "little":
        vector.byteswap()
    return vector.tobytes()


def unpack(data: bytes) -> list[float]:
    vector = array("f")
    vector.frombytes(data)
    if sys.byteorder != "little":
        vector.byteswap()
    return vector.tolist()


def pooled(rows: Any) -> list[float]:
    """One vector from what an engine returned: itself, or, for a causal model that gives one
    vector per token (llama.cpp without pooling), their mean, normalized to length 1."""
    if rows and isinstance(rows[0], list):
        n = len(rows)
        mean = [sum(column) / n for column in zip(*rows, strict=True)]
        norm = math.sqrt(sum(x * x for x in mean)) or 1.0
        return [x / norm for x in mean]
    return rows
