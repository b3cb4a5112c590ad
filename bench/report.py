"""The request-path benchmark's figures: the table, the targets of the issue, the plot."""

from __future__ import annotations

# The targets.
ADDED_P50_MS = 1.0
REQ_PER_S_64 = 2000.0
TOKENS_PER_S_STREAMS = 50_000.0
TTFE_RATIO = 2.0


def _pair(runs: list[dict], scenario: str) -> tuple[dict, dict]:
    found = {r["path"]: r for r in runs if r["scenario"] == scenario}
    return found["direct"], found["stack"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def targets(runs: list[dict], one: str, many: str, streams: str) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    d1, s1 = _pair(runs, one)
    _, s64 = _pair(runs, many)
    ds, ss = _pair(runs, streams)
    added = None
    if s1["latency_ms"]["p50"] is not None and d1["latency_ms"]["p50"] is not None:
        added = s1["latency_ms"]["p50"] - d1["latency_ms"]["p50"]
    ttfe = _ratio(ss["ttfe_ms"]["p50"], ds["ttfe_ms"]["p50"])
    rows = [
        (f"added p50 latency, {one}", added, "{:+.2f} ms", f"<= {ADDED_P50_MS:g} ms",
         added is not None and added <= ADDED_P50_MS),
        (f"non-streaming, {many}", s64["req_per_s"], "{:.0f} req/s", f">= {REQ_PER_S_64:,.0f} req/s",
         s64["req_per_s"] >= REQ_PER_S_64),
        (f"streaming, {streams} tokens", ss["tokens_per_s"], "{:.0f} tokens/s",
         f">= {TOKENS_PER_S_STREAMS:,.0f} tokens/s", ss["tokens_per_s"] >= TOKENS_PER_S_STREAMS),
        (f"time to first event p50, {streams}", ttfe, "{:.1f}x direct", f"<= {TTFE_RATIO:g}x direct",
         ttfe is not None and ttfe <= TTFE_RATIO),
    ]  # fmt: skip
    return [
        {"target": what, "value": value, "shown": "-" if value is None else shown.format(value),
         "goal": goal, "met": bool(met)}
        for what, value, shown, goal, met in rows
    ]  # fmt: skip


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def table(runs: list[dict], goals: list[dict], meta: dict) -> str:
    head = (f"{'scenario':<16} {'path':<12} {'req/s':>8} {'tokens/s':>9} {'events/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
            f" {'ttfe p50':>8} {'ttfe p99':>8} {'errors':>6} {'stack cpu':>9} {'mock cpu':>8}")  # fmt: skip
    out = [
        "Request path: straight to the mock engine (direct) vs through `first up` (stack) to it.",
        f"{meta['cores']} cores shared by everything; {meta['seconds']:g} s per run after {meta['warmup']:g} s"
        " of warm-up; cpu columns: CPU ms per request;",
        "tokens/s from usage.completion_tokens, events/s: streamed events carrying text.",
        "",
        head,
    ]
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    for name in scenarios:
        direct, stack = _pair(runs, name)
        for label, r in (("direct", direct), ("stack", stack)):
            lat, ttfe, cpu = r["latency_ms"], r["ttfe_ms"], r["cpu"]
            out.append(
                f"{name if label == 'direct' else '':<16} {label:<12} {r['req_per_s']:8.0f} {r['tokens_per_s']:9.0f}"
                f" {_f(r['text_events_per_s'] if r['stream'] else None, '{:.0f}'):>8} {_f(lat['p50']):>7} {_f(lat['p99']):>7} {_f(ttfe['p50']):>8} {_f(ttfe['p99']):>8}"
                f" {r['errors']:>6} {_f(cpu['stack_ms_per_req'] if label == 'stack' else None):>9}"
                f" {_f(cpu['mock_ms_per_req'], '{:.3f}'):>8}"
            )
        ratios = [
            _ratio(stack["req_per_s"], direct["req_per_s"]),
            _ratio(stack["tokens_per_s"], direct["tokens_per_s"]),
            None,
            _ratio(stack["latency_ms"]["p50"], direct["latency_ms"]["p50"]),
            _ratio(stack["latency_ms"]["p99"], direct["latency_ms"]["p99"]),
            _ratio(stack["ttfe_ms"]["p50"], direct["ttfe_ms"]["p50"]),
            _ratio(stack["ttfe_ms"]["p99"], direct["ttfe_ms"]["p99"]),
        ]
        widths = (8, 9, 8, 7, 7, 8, 8)
        cells = " ".join(f"{_f(v, '{:.2f}x'):>{w}}" for v, w in zip(ratios, widths, strict=True))
        dp, sp = direct["latency_ms"]["p50"], stack["latency_ms"]["p50"]
        added = None if dp is None or sp is None else sp - dp
        out.append(f"{'':<16} {'stack/direct':<12} {cells}   added p50 {_f(added, '{:+.2f}')} ms")
    out += [
        "",
        "Stack CPU by process, ms per request (cores busy, share in the kernel); other load, in cores:",
    ]
    for r in runs:
        if r["path"] == "stack":
            cpu = r["cpu"]
            parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu["stack_by_process_ms_per_req"].items())
            out.append(
                f"  {r['scenario']:<16} {parts}  ({cpu['stack_cores']:.2f} cores, {cpu['stack_sys_share']:.0%} sys); "
                f"load generator {cpu['loadgen_ms_per_req']:.3f}; other load {cpu['other_cores']:.2f}"
                f" (steal {cpu['steal_cores']:.2f})"
            )
    out += ["", f"{'target':<42} {'measured':>16}  {'goal':<22} met"]
    out += [
        f"{g['target']:<42} {g['shown']:>16}  {g['goal']:<22} {'yes' if g['met'] else 'NO'}" for g in goals
    ]
    noisy = max((r["cpu"]["other_cores"] for r in runs), default=0.0)
    if noisy > 0.2:
        out.append(
            f"\nnote: other processes used up to {noisy:.1f} cores during a run: the figures are noisy."
        )
    bound = [f"{r['scenario']} {r['path']}" for r in runs if r["cpu"]["loadgen_cores"] > 0.9]
    if bound:
        out.append(
            f"note: the load generator used a whole core in {', '.join(bound)}: those figures are its own."
        )
    return "\n".join(out)


def plot(runs: list[dict], path: str) -> None:
    """Two panels against clients: p50 latency and req/s, direct and through the stack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    ticks = sorted({r["clients"] for r in runs})
    for label, style in (("direct", "o-"), ("stack", "s-")):
        rows = sorted((r for r in runs if r["path"] == label), key=lambda r: r["clients"])
        clients = [r["clients"] for r in rows]
        lat.plot(clients, [r["latency_ms"]["p50"] for r in rows], style, label=label)
        rate.plot(clients, [r["req_per_s"] for r in rows], style, label=label)
    for ax, title, unit in ((lat, "p50 latency", "ms"), (rate, "throughput", "requests/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients (non-streaming, 16 tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Request path: direct to the mock engine vs through the stack")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
