"""A Prometheus counter of a NATS connection's reconnects, for every service that exports metrics."""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class _NatsReconnects(Collector):
    """nats-py's own count of the connection's reconnects, read at scrape time."""

    def __init__(self, name: str, nc_of: Callable[[], NATS | None]):
        self.name, self._nc_of = name, nc_of

    def collect(self):
        nc = self._nc_of()
        value = nc.stats["reconnects"] if nc is not None else 0
        yield CounterMetricFamily(self.name, "Reconnects of this process's NATS connection.", value=value)


def nats_reconnects(registry: CollectorRegistry, name: str, nc_of: Callable[[], NATS | None]) -> None:
    """Register ``<name>_total``: the reconnects of the connection ``nc_of()`` returns (None: 0)."""
    registry.register(_NatsReconnects(name, nc_of))
