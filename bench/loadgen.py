"""A closed-loop HTTP load generator that costs little CPU, so the server's share of the cores is the figure.

Each client holds one HTTP/1.1 keep-alive connection (raw asyncio protocol, uvloop when there)
and sends its next request when the last answer is complete. Every answer is checked: a whole
one must be JSON with choices, a stream must end with ``data: [DONE]`` and carry no error event.

Run as its own process; it prints one JSON object (requests, errors by status, req/s, tokens/s,
latency and time-to-first-event percentiles) and, on stderr, ``measuring`` when warm-up ends.
Tokens are the answers' ``usage.completion_tokens`` (streams ask for the usage chunk); streams
also count their events carrying text, which differ where a server packs tokens together::

    python -m bench.loadgen --url http://127.0.0.1:8000/v1/completions --model M --clients 64 \\
        --seconds 10 [--stream --tokens 64] [--warmup 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

from bench.http_client import Answer, Connection


@dataclass
class Load:
    url: str
    model: str
    clients: int = 1
    requests: int | None = None  # stop after this many answers, or
    seconds: float | None = None  # after this long
    stream: bool = False
    tokens: int = 16
    warmup: float = 0.0
    timeout: float = 60.0  # per request
    extra: dict = field(default_factory=dict)  # more body fields (mock_itl_ms, ...)

    def request_bytes(self) -> bytes:
        parts = urlsplit(self.url)
        body = {"model": self.model, "max_tokens": self.tokens, "stream": self.stream}
        if self.stream:  # tokens are counted from the usage chunk: a server may pack several in one event
            body["stream_options"] = {"include_usage": True}
        if parts.path.endswith("/chat/completions"):
            body["messages"] = [{"role": "user", "content": "benchmark"}]
        else:
            body["prompt"] = "benchmark"
        raw = orjson.dumps(dict(body, **self.extra))
        head = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
        )
        return head.encode() + raw


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    first_events: list[float] = field(default_factory=list)
    tokens: int = 0
    text_events: int = 0
    errors: Counter = field(default_factory=Counter)

    def add(self, answer: Answer, started: float) -> None:
        if answer.error:
            self.errors[answer.error] += 1
            return
        self.latencies.append(answer.finished - started)
        if answer.first_event:
            self.first_events.append(answer.first_event - started)
        self.tokens += answer.tokens
        self.text_events += answer.text_events


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000


async def _client(load: Load, request: bytes, host: str, port: int, more, tally_of) -> None:
    loop = asyncio.get_running_loop()
    conn: Connection | None = None
    try:
        while more():
            if conn is None or conn.lost:
                try:
                    _, conn = await loop.create_connection(lambda: Connection(load.stream), host, port)
                except OSError:
                    tally_of().errors["connect"] += 1
                    await asyncio.sleep(0.1)
                    continue
            started = time.perf_counter()
            tally = tally_of()  # read before the answer: warm-up answers stay in warm-up
            try:
                async with asyncio.timeout(load.timeout):
                    answer = await conn.send(request)
            except TimeoutError:
                answer = Answer(error="timeout")
                conn.close()
            tally.add(answer, started)
            if answer.error or not answer.keep_alive:
                conn.close()  # the framing may be lost: start afresh
    finally:
        if conn is not None:
            conn.close()


async def run(load: Load) -> dict:
    """Drive ``load`` and return its figures (what the command prints)."""
    if (load.requests is None) == (load.seconds is None):
        raise ValueError("give requests or seconds, not both")
    parts = urlsplit(load.url)
    request = load.request_bytes()
    warm, measured = Tally(), Tally()
    phase = {"tally": warm if load.warmup > 0 else measured, "left": load.requests, "until": math.inf}

    def tally_of() -> Tally:
        return phase["tally"]

    def more() -> bool:
        if phase["tally"] is warm:
            return True
        if phase["left"] is not None:
            phase["left"] -= 1
            return phase["left"] >= 0
        return time.perf_counter() < phase["until"]

    tasks = [
        asyncio.create_task(_client(load, request, parts.hostname, parts.port or 80, more, tally_of))
        for _ in range(load.clients)
    ]
    try:
        if load.warmup > 0:
            await asyncio.sleep(load.warmup)
        print("measuring", file=sys.stderr, flush=True)
        started = time.perf_counter()
        if load.seconds is not None:
            phase["until"] = started + load.seconds
        phase["tally"] = measured
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - started
    ok = len(measured.latencies)
    return {
        "url": load.url,
        "clients": load.clients,
        "stream": load.stream,
        "max_tokens": load.tokens,
        "requests": ok,
        "errors": sum(measured.errors.values()),
        "errors_by_status": dict(measured.errors),
        "warmup_requests": len(warm.latencies),
        "warmup_errors_by_status": dict(warm.errors),
        "seconds": elapsed,
        "req_per_s": ok / elapsed,
        "tokens_per_s": measured.tokens / elapsed,
        "text_events_per_s": measured.text_events / elapsed,
        "latency_ms": {
            q: percentile(measured.latencies, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        },
        "ttfe_ms": {q: percentile(measured.first_events, v) for q, v in (("p50", 0.5), ("p99", 0.99))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000/v1/completions")
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=1, help="concurrent connections, one request each")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--requests", type=int, help="answers to measure, all clients together")
    group.add_argument("--seconds", type=float, help="how long to measure")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of each request")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds of load before measuring")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--extra", type=orjson.loads, default={}, help="JSON object merged into each body")
    args = parser.parse_args()
    load = Load(
        args.url, args.model, args.clients, args.requests, args.seconds,
        args.stream, args.tokens, args.warmup, args.timeout, args.extra,
    )  # fmt: skip
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(load))
    else:
        result = uvloop.run(run(load))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
