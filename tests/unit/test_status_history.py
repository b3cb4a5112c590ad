"""The status page's memory (services/gateway/status_history.py): bounded whatever comes in, the
charts' series aligned on one time axis, tokens/s from the usage records, events newest first."""

from __future__ import annotations

from services.gateway import status_history as sh
from shared import schema


def usage(model: str, completion: int) -> schema.UsageRecord:
    return schema.UsageRecord(
        request_id="r", model=model, endpoint="chat", worker_id="w", cluster="c", outcome="ok",
        prompt_tokens=5, completion_tokens=completion,
    )  # fmt: skip


def test_history_keeps_its_span_and_fills_gaps_with_zero():
    history = sh.History(span_s=10, sample_s=5)  # 3 samples: now, -5 s, -10 s
    for i in range(5):
        history.add(sh.Sample(float(i), {"a": i} if i != 3 else {}, {"a": i / 2}))
    assert len(history) == 3
    assert history.series(["a", "b"]) == {
        "t": [2.0, 3.0, 4.0],
        "models": {
            "a": {"queued": [2, 0, 4], "tokens_per_s": [1.0, 1.5, 2.0]},
            "b": {"queued": [0, 0, 0], "tokens_per_s": [0.0, 0.0, 0.0]},
        },
    }


def test_history_is_capped_however_it_is_configured():
    assert sh.History(span_s=86_400, sample_s=0.1)._samples.maxlen == sh.MAX_SAMPLES


def test_token_meter_rates_are_per_second_since_the_last_call():
    now = [100.0]
    meter = sh.TokenMeter(clock=lambda: now[0])
    meter.add(usage("a", 30))
    meter.add(usage("a", 10))
    meter.add(usage("b", 4))
    now[0] = 102.0
    assert meter.rates() == {"a": 20.0, "b": 2.0}  # completion tokens only
    now[0] = 104.0
    assert meter.rates() == {"a": 0.0, "b": 0.0}


def test_token_meter_bounds_the_models_it_counts():
    meter = sh.TokenMeter()
    for i in range(sh.MAX_MODELS + 10):
        meter.add(usage(f"m{i}", 1))
    assert len(meter.rates()) == sh.MAX_MODELS


def test_event_log_merges_the_stream_newest_first_once_each_and_bounded():
    log = sh.EventLog()
    ev = {"kind": "node", "name": "running", "node_id": "n1", "source": "scaler", "time": 5.0}
    log.add(ev)
    older = [{**ev, "name": "requested", "time": 1.0}, dict(ev)]  # the live one, read back again
    log.merge(older)
    assert [(e["name"], e["time"]) for e in log.newest()] == [("running", 5.0), ("requested", 1.0)]
    log.add({**ev, "name": "requested", "time": 1.0})  # its live copy, after the stream's
    assert len(log.newest()) == 2
    log.merge([{**ev, "time": float(t)} for t in range(100, 100 + sh.MAX_EVENTS * 2)])
    newest = log.newest()
    assert len(newest) == sh.MAX_EVENTS and newest[0]["time"] == 100 + sh.MAX_EVENTS * 2 - 1
