"""Prometheus scrapes in tests: every sample of a /metrics page, and how one moved between two."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str) -> Samples:
    """GET ``url`` (a /metrics page, no credential, as Prometheus sends): (name, label pairs) -> value."""
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    """The sample of ``metric`` with exactly these labels; None where the scrape has none."""
    return samples.get((metric, tuple(sorted(labels.items()))))


def moved(before: Samples, after: Samples, metric: str, /, **labels: str) -> float:
    return (value(after, metric, **labels) or 0.0) - (value(before, metric, **labels) or 0.0)
