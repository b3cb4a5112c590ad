"""What the status page remembers between polls, each bounded whatever the input: the recent past
of every model (``History``: queue depth and tokens/s, one sample every few seconds), the tokens
the workers report (``TokenMeter``, fed by the usage records) and the newest node events
(``EventLog``, fed by the events stream). Pure bookkeeping, no I/O: services/gateway/status_page.py feeds them."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shared import schema

# Models a deployment may name is bounded by its config; ids from the wire are not, so they are
# capped before they become keys.
MAX_MODELS = 256
MAX_EVENTS = 50
MAX_SAMPLES = 4096


@dataclass(slots=True)
class Sample:
    at: float  # unix seconds
    queued: dict[str, int]
    tokens_per_s: dict[str, float]


class History:
    """A ring of samples covering ``span_s`` at one per ``sample_s``: the charts' data."""

    def __init__(self, span_s: float, sample_s: float):
        self.sample_s = sample_s
        self._samples: deque[Sample] = deque(maxlen=min(MAX_SAMPLES, max(2, int(span_s / sample_s) + 1)))

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)

    def __len__(self) -> int:
        return len(self._samples)

    def series(self, models: list[str]) -> dict:
        """``{"t": [...], "models": {id: {"queued": [...], "tokens_per_s": [...]}}}``, oldest first;
        a model absent from a sample counts 0 there."""
        samples = list(self._samples)
        return {
            "t": [round(s.at, 3) for s in samples],
            "models": {
                m: {
                    "queued": [s.queued.get(m, 0) for s in samples],
                    "tokens_per_s": [round(s.tokens_per_s.get(m, 0.0), 2) for s in samples],
                }
                for m in models
            },
        }


class TokenMeter:
    """Tokens generated per model, as the workers' usage records count them; ``rates()`` is the
    tokens per second since its previous call."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._total: dict[str, int] = {}
        self._since: dict[str, int] = {}
        self._last = clock()

    def add(self, record: schema.UsageRecord) -> None:
        if record.model not in self._total and len(self._total) >= MAX_MODELS:
            return
        self._total[record.model] = self._total.get(record.model, 0) + record.completion_tokens

    def rates(self) -> dict[str, float]:
        now = self.clock()
        elapsed, self._last = max(now - self._last, 1e-6), now
        rates = {m: (n - self._since.get(m, 0)) / elapsed for m, n in self._total.items()}
        self._since = dict(self._total)
        return rates


@dataclass(slots=True)
class EventLog:
    """The newest events, newest first, as the page lists them."""

    events: deque[dict] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))

    def add(self, event: dict) -> None:
        """A live event; one the stream's read-back already gave (its live copy can come later) is
        not listed twice."""
        key = _key(event)
        if not any(_key(e) == key for e in self.events):  # at most MAX_EVENTS: few
            self.events.appendleft(event)

    def merge(self, older: list[dict]) -> None:
        """Events read back from the stream: with those already here, newest first, each once."""
        seen, merged = set(), []
        for event in sorted([*self.events, *older], key=lambda e: e["time"], reverse=True):
            if (key := _key(event)) not in seen:
                seen.add(key)
                merged.append(event)
        self.events = deque(merged[: self.events.maxlen], maxlen=self.events.maxlen)

    def newest(self) -> list[dict]:
        return list(self.events)


def _key(event: dict) -> tuple:
    return (event["time"], event["kind"], event["name"], event.get("node_id"), event.get("source"))
