"""Bounded copies of what clients send, for log lines and error messages.

A client controls the path, the method, header values and every string of the body; any of them
may be kilobytes long. Whatever the gateway logs or echoes back goes through ``clip`` first.
"""

from __future__ import annotations

LOG_LIMIT = 128


def clip(text: str | None, limit: int = LOG_LIMIT) -> str | None:
    """``text`` cut to ``limit`` characters, with a marker that says how long it was."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text)} chars]"
