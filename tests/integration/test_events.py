"""Where events come from, on the session's nats-server: the scaler reports a worker whose
heartbeats stop, a gateway reports a user over a limit once a minute (not once per refusal), an
event that repeats says how many were left out, and the stream keeps the config's limits."""

from __future__ import annotations

import asyncio
import time

from shared import events, schema
from tests.integration.conftest import make_config
from tests.integration.test_limits import limited_config, stack  # noqa: F401 (a fixture)
from tests.integration.test_scaler import BatchQueueProvider, start_scaler
from tests.support import eventually


async def collect(nc, subject: str) -> list[schema.Event]:
    seen: list[schema.Event] = []

    async def on_event(msg) -> None:
        seen.append(events.decode(msg.data))

    await nc.subscribe(subject, cb=on_event)
    await nc.flush()
    return seen


async def test_a_worker_whose_heartbeats_stop_is_reported_lost_once_by_the_scaler(services, nc, subjects):
    config = make_config([{"id": "m", "clusters": ["a"]}], scaler={"tick_s": 0.05})
    await start_scaler(services, config, BatchQueueProvider())
    seen = await collect(nc, subjects.events_of("worker"))
    # The worker's side: heartbeats, as a worker process sends them, until it dies.
    beat = schema.Heartbeat(
        worker_id="a-n0", cluster="a", model="m", state="ready", capacity=4, in_flight=0, interval_s=0.1,
        node_id="a-n0",
    )  # fmt: skip
    for _ in range(5):
        await nc.publish(subjects.heartbeat("a", "a-n0"), schema.encode(beat))
        await asyncio.sleep(0.05)
    died = time.monotonic()
    lost = await eventually(lambda: [e for e in seen if e.name == "lost"], what="the worker.lost event")
    took = time.monotonic() - died
    assert took < 2.0, f"reported {took:.1f} s after the last heartbeat (3 missed at 0.1 s)"
    await asyncio.sleep(0.3)
    assert len([e for e in seen if e.name == "lost"]) == 1
    event = lost[0]
    assert (event.source, event.worker_id, event.cluster, event.model) == ("scaler", "a-n0", "a", "m")
    assert event.reason.startswith("no heartbeat for")


async def test_a_user_over_a_limit_is_one_event_a_minute_not_one_per_refusal(stack, subjects, nc):  # noqa: F811
    seen = await collect(nc, subjects.events_of("limit"))
    (gw,) = await stack(limited_config(subjects, {"user": {"requests_per_s": 1}}))
    answers = await asyncio.gather(*(gw.ask("alice") for _ in range(6)))
    assert sorted(status for status, _, _ in answers).count(429) == 5
    hit = await eventually(lambda: [e for e in seen if e.name == "hit"], what="the limit.hit event")
    await asyncio.sleep(0.3)
    assert len(seen) == 1, [e.data for e in seen]
    assert (hit[0].user, hit[0].model) == ("alice", "m")
    assert "1 requests/s per user" in hit[0].reason and hit[0].data["retry_after_s"] > 0


async def test_an_event_that_repeats_goes_once_per_period_and_counts_those_left_out(nc, subjects):
    seen = await collect(nc, subjects.events_of("request"))
    publisher = events.EventPublisher(nc, subjects, "router-test")
    for _ in range(4):
        await publisher.emit_at_most(0.2, "m", "request", "failed", model="m", reason="full")
    await publisher.emit_at_most(0.2, "other", "request", "failed", model="other")
    await asyncio.sleep(0.25)
    await publisher.emit_at_most(0.2, "m", "request", "failed", model="m", reason="full")
    await eventually(lambda: len(seen) == 3, what="three events")
    assert [(e.model, e.data.get("left_out")) for e in seen] == [("m", None), ("other", None), ("m", 3)]


async def test_the_event_stream_keeps_the_configs_retention_and_size(nc, subjects):
    config = make_config(
        [], nats={"subject_prefix": subjects.prefix}, events={"retention_days": 2, "max_megabytes": 5}
    )
    info = await events.ensure(nc, config)
    try:
        assert info.config.subjects == [f"{subjects.prefix}.v1.events.>"]
        assert (info.config.max_age, info.config.max_bytes) == (2 * 86_400, 5_000_000)
        shorter = make_config([], nats={"subject_prefix": subjects.prefix}, events={"retention_days": 1})
        info = await events.ensure(nc, shorter)
        assert (info.config.max_age, info.config.max_bytes) == (86_400, 1_024_000_000)
    finally:
        await nc.jetstream().delete_stream(events.stream_name(config))
