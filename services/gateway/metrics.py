"""The gateway's Prometheus metrics (GET /metrics), with prometheus_client.

What it costs a request: the handler fills an ``Outcome`` (the cluster, the token counts, when the
first chunk came), and the request middleware observes it once, at the request's end
(``GatewayMetrics.observe``). Nothing is done per token. Label values are bounded: a model or
cluster not in the config is counted as ``other``; ``status`` is the HTTP status the caller saw
(or, for an event stream, the status of the error that ended it, 499 where the caller left).

The per-request figures are plain numbers, found with one dict lookup per request and turned into
prometheus_client's metric families at scrape time (``_RequestCollector``): prometheus_client's
own Counter and Histogram take a lock per increment and scan the buckets in order, about 5 times
the cost (3.6 µs for a whole answer instead of 0.6, 7.5 µs for a stream instead of 1.7, where the
gateway's process spends about 300 µs per request; docs/benchmarks.md). Everything runs on the
event loop: a scrape never sees half an observation.

docs/metrics.md lists every metric with its labels.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from shared import schema
from shared.config import Config
from shared.nats_metrics import nats_reconnects

OTHER = "other"  # every model or cluster the config does not name
NONE = "none"  # no cluster: the request ended before a worker took it
CLIENT_CLOSED = 499  # nginx's status for a caller that left before its answer ended

# A cold start can take minutes: the first token's wait and a whole request reach that far.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class Outcome:
    """What one inference request came to, filled by its handler, observed by the middleware."""

    __slots__ = ("cluster", "completion_tokens", "endpoint", "first_at", "prompt_tokens", "status")

    def __init__(self, endpoint: schema.Endpoint):
        self.endpoint = endpoint
        self.cluster = ""
        self.prompt_tokens = self.completion_tokens = 0
        self.first_at = 0.0  # time.monotonic() of a stream's first chunk; 0: none (or not a stream)
        self.status = 0  # 0: the response's own status

    def answered(self, started: schema.Started | None, usage: schema.Usage | None, streamed: int = 0) -> None:
        """Which cluster served it and the tokens it used (``streamed``: text pieces that reached
        the caller, about a token each, where the answer ended without its usage)."""
        if started is not None:
            self.cluster = started.cluster
        if usage is not None:
            self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        else:
            self.completion_tokens = streamed


class _Histogram:
    """One label set's histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: Prometheus's le
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((floatToGoString(bound), total))
        return out


class _Series:
    """What one request's labels (model, cluster, endpoint, status) add to, reached with one lookup:
    its own count, and the histograms and token counts it shares with other statuses."""

    __slots__ = ("itl", "latency", "requests", "tokens", "ttft")

    def __init__(self, latency: _Histogram, ttft: _Histogram, itl: _Histogram, tokens: list[int]):
        self.requests = 0
        self.latency, self.ttft, self.itl, self.tokens = latency, ttft, itl, tokens


class _RequestCollector(Collector):
    """The per-request metrics as prometheus_client families, built at each scrape."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str, int], _Series] = {}
        self.latency: dict[tuple[str, str, str], _Histogram] = {}
        self.ttft: dict[tuple[str, str], _Histogram] = {}
        self.itl: dict[tuple[str, str], _Histogram] = {}
        self.tokens: dict[tuple[str, str], list[int]] = {}  # [in, out]

    def make(self, key: tuple[str, str, str, int]) -> _Series:
        model, cluster, endpoint, _ = key
        pair = (model, cluster)
        latency = self.latency.setdefault((*pair, endpoint), _Histogram(LATENCY_BUCKETS))
        if pair not in self.tokens:
            self.ttft[pair], self.itl[pair], self.tokens[pair] = (
                _Histogram(TTFT_BUCKETS),
                _Histogram(ITL_BUCKETS),
                [0, 0],
            )
        series = self.series[key] = _Series(latency, self.ttft[pair], self.itl[pair], self.tokens[pair])
        return series

    def collect(self) -> Iterator[Metric]:
        pair, triple = ("model", "cluster"), ("model", "cluster", "endpoint")
        requests = CounterMetricFamily(
            "first_gateway_requests", "Inference requests by model, cluster, endpoint and HTTP status.",
            labels=(*triple, "status"),
        )  # fmt: skip
        for (model, cluster, endpoint, status), series in self.series.items():
            requests.add_metric((model, cluster, endpoint, str(status)), series.requests)
        yield requests
        yield _histograms(
            "first_gateway_request_duration_seconds",
            "Inference requests: from arrival to the answer's end (or the error), by endpoint.",
            triple, self.latency,
        )  # fmt: skip
        yield _histograms(
            "first_gateway_time_to_first_token_seconds",
            "Streamed requests: from the request's arrival to its first chunk (queue and cold start included).",
            pair, self.ttft,
        )  # fmt: skip
        yield _histograms(
            "first_gateway_inter_token_latency_seconds",
            "Streamed requests: the mean time between tokens after the first, one sample per request.",
            pair, self.itl,
        )  # fmt: skip
        tokens = CounterMetricFamily(
            "first_gateway_tokens", "Tokens of the answers: direction in (prompt) or out (completion).",
            labels=(*pair, "direction"),
        )  # fmt: skip
        for key, (tokens_in, tokens_out) in self.tokens.items():
            tokens.add_metric((*key, "in"), tokens_in)
            tokens.add_metric((*key, "out"), tokens_out)
        yield tokens


def _histograms(name: str, documentation: str, labels: tuple[str, ...], table: dict) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, h in table.items():
        family.add_metric(key, h.buckets(), h.sum)
    return family


class GatewayMetrics:
    """The gateway's metrics in a registry of their own (one per app: no process-wide state)."""

    def __init__(self, config: Config, nc_of: Callable[[], NATS | None]):
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self._models = frozenset(m.id for m in config.models)
        self._clusters = frozenset(c.name for c in config.clusters)
        self._requests = _RequestCollector()
        registry.register(self._requests)
        self._series = self._requests.series
        self.refusals = Counter(
            "first_gateway_limit_refusals",
            "Requests refused with 429 because the caller was over a limit.",
            ("model",),
            registry=registry,
        )
        nats_reconnects(registry, "first_gateway_nats_reconnects", nc_of)

    def model_label(self, model: str | None) -> str:
        return model if model in self._models else OTHER

    def observe(self, outcome: Outcome, model: str | None, status: int, started: float, now: float) -> None:
        """One request at its end: ``started`` and ``now`` from time.monotonic()."""
        cluster = outcome.cluster
        if cluster not in self._clusters:
            cluster = OTHER if cluster else NONE
        key = (model if model in self._models else OTHER, cluster, outcome.endpoint, outcome.status or status)
        if (series := self._series.get(key)) is None:
            series = self._requests.make(key)  # bounded: the labels are
        series.requests += 1
        series.latency.observe(now - started)
        tokens = series.tokens
        tokens[0] += outcome.prompt_tokens
        tokens[1] += outcome.completion_tokens
        if outcome.first_at:
            series.ttft.observe(outcome.first_at - started)
            if outcome.completion_tokens > 1:
                series.itl.observe((now - outcome.first_at) / (outcome.completion_tokens - 1))

    def refused(self, model: str) -> None:
        self.refusals.labels(self.model_label(model)).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The scrape's body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
