"""The usage stream on a real nats-server: created and kept in line with the config by every router
(several at once), and holding each run's record exactly once, whoever published it and however
often."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import msgspec
import nats
import nats.js.errors
import orjson
import pytest

from services.admin.usage import Report
from shared import config as cfg
from shared import schema, usage_stream
from shared.config import load_config
from tests.integration.conftest import make_config
from tests.processes import Fleet
from tests.support import Stack, eventually

pytestmark = pytest.mark.timeout(60)


def usage_config(subjects, **usage) -> cfg.Config:
    raw = {"nats": {"subject_prefix": subjects.prefix}, "usage": usage, "clusters": [{"name": "a"}]}
    raw["models"] = [{"id": "m", "engine": {"kind": "sim"}}]
    return msgspec.convert(raw, cfg.Config)


@pytest.fixture
async def stream(nc, subjects):
    """The test's usage stream, removed at the end (the session's server keeps every test's)."""
    config = usage_config(subjects)
    await usage_stream.ensure(nc, config)
    yield config
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await nc.jetstream().delete_stream(usage_stream.stream_name(config))


async def publish(nc, subjects, record: schema.UsageRecord, *, msg_id: bool = True) -> None:
    """As the worker publishes it (services/worker/run.py): core NATS, its run's Nats-Msg-Id."""
    headers = (
        {usage_stream.MSG_ID: usage_stream.msg_id(record.request_id, record.attempt)} if msg_id else None
    )
    await nc.publish(subjects.usage, schema.encode(record), headers=headers)


def record(rid: str, attempt: int = 0, **kw) -> schema.UsageRecord:
    fields = {"model": "m", "endpoint": "chat", "worker_id": "w1", "cluster": "a", "outcome": "ok"}
    return schema.UsageRecord(request_id=rid, attempt=attempt, **{**fields, **kw})


async def stored(nc, config, since: float = 0.0) -> list[usage_stream.Stored]:
    return [s async for s in usage_stream.read(nc, config, since)]


async def stored_count(nc, config) -> int:
    return (await nc.jetstream().stream_info(usage_stream.stream_name(config))).state.messages


# --- creating and updating ----------------------------------------------------------------------


async def test_ensure_creates_the_stream_as_configured_and_a_second_call_changes_nothing(nc, subjects):
    config = usage_config(subjects, retention_days=30)
    js = nc.jetstream()
    name = usage_stream.stream_name(config)
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.stream_info(name)
    try:
        created = await usage_stream.ensure(nc, config)
        assert created.config.subjects == [subjects.usage]
        assert created.config.storage == "file"
        assert created.config.max_age == 30 * 86_400 and created.config.duplicate_window == 120
        again = await usage_stream.ensure(nc, config)
        assert again.created == created.created and again.config == created.config
    finally:
        await js.delete_stream(name)


async def test_a_changed_retention_updates_the_stream_and_keeps_its_records_and_other_limits(nc, subjects):
    config = usage_config(subjects, retention_days=400)
    info = await usage_stream.ensure(nc, config)
    js = nc.jetstream()
    try:
        await js.update_stream(dataclasses.replace(info.config, max_bytes=1 << 30))  # an operator's
        await publish(nc, subjects, record("r1"))
        await eventually(lambda: stored_count(nc, config), what="the record stored")
        shorter = usage_config(subjects, retention_days=7)
        updated = await usage_stream.ensure(nc, shorter)
        assert updated.config.max_age == 7 * 86_400
        assert updated.config.max_bytes == 1 << 30, "an operator's own limit stays"
        assert updated.state.messages == 1
    finally:
        await js.delete_stream(info.config.name)


async def test_records_older_than_the_retention_are_dropped(nc, subjects):
    config = usage_config(subjects, retention_days=1 / 86_400)  # one second
    info = await usage_stream.ensure(nc, config)
    try:
        assert info.config.max_age == pytest.approx(1.0) and info.config.duplicate_window == pytest.approx(
            1.0
        )
        await publish(nc, subjects, record("old"))
        await eventually(lambda: stored_count(nc, config), what="the record stored")
        await eventually(lambda: _none_left(nc, config), timeout=5, what="the record aged out")
    finally:
        await nc.jetstream().delete_stream(info.config.name)


async def _none_left(nc, config) -> bool:
    return await stored_count(nc, config) == 0


async def test_many_routers_ensuring_at_once_all_succeed_creating_and_updating(nats_url, subjects):
    conns = [await nats.connect(nats_url) for _ in range(8)]
    try:
        created = await asyncio.gather(*(usage_stream.ensure(c, usage_config(subjects)) for c in conns))
        assert len({i.created for i in created}) == 1, "one stream, created once"
        # A new retention reaches every router at once (a rolling restart with the new config).
        shorter = usage_config(subjects, retention_days=90)
        updated = await asyncio.gather(*(usage_stream.ensure(c, shorter) for c in conns))
        assert {i.config.max_age for i in updated} == {90 * 86_400}
    finally:
        await conns[0].jetstream().delete_stream(usage_stream.stream_name(usage_config(subjects)))
        for c in conns:
            await c.close()


async def test_a_configured_stream_that_stores_another_subject_is_refused(nc, subjects):
    js = nc.jetstream()
    await js.add_stream(name=f"{subjects.prefix}_other", subjects=[f"{subjects.prefix}.elsewhere"])
    try:
        config = usage_config(subjects, stream=f"{subjects.prefix}_other")
        with pytest.raises(usage_stream.UsageStreamError, match=r"set usage\.stream to another name"):
            await usage_stream.ensure(nc, config)
        assert (await js.stream_info(f"{subjects.prefix}_other")).config.subjects == [
            f"{subjects.prefix}.elsewhere"
        ], "left as it was"
    finally:
        await js.delete_stream(f"{subjects.prefix}_other")


# --- exactly once -------------------------------------------------------------------------------


async def test_the_same_run_published_twice_is_stored_once_and_a_new_attempt_is_a_new_run(
    nc, subjects, stream
):
    await publish(nc, subjects, record("r1", outcome="retried", prompt_tokens=10))
    await publish(nc, subjects, record("r1", outcome="retried", prompt_tokens=10))  # a re-send
    await publish(nc, subjects, record("r1", attempt=1, prompt_tokens=10, completion_tokens=5))
    await publish(nc, subjects, record("r2"))
    await publish(nc, subjects, record("r2"))
    await nc.flush()
    await eventually(lambda: _count_is(nc, stream, 3), what="three runs stored")
    records = [schema.usage_decoder.decode(s.data) for s in await stored(nc, stream)]
    assert [(r.request_id, r.attempt) for r in records] == [("r1", 0), ("r1", 1), ("r2", 0)]
    report = Report("user", 0.0, "S")
    for r in records:
        report.add(r)
    assert (len(report.total.request_ids), report.total.runs) == (2, 3)


async def test_without_its_msg_id_a_re_sent_record_would_count_twice(nc, subjects, stream):
    """What the header buys: the stream alone does not tell a re-send from a new record."""
    await publish(nc, subjects, record("r1"), msg_id=False)
    await publish(nc, subjects, record("r1"), msg_id=False)
    await eventually(lambda: _count_is(nc, stream, 2), what="both stored")


async def _count_is(nc, config, n: int) -> bool:
    return await stored_count(nc, config) == n


# --- reading ------------------------------------------------------------------------------------


async def test_reading_starts_at_the_given_time_and_leaves_no_consumer_behind(nc, subjects, stream):
    await publish(nc, subjects, record("before"))
    await eventually(lambda: _count_is(nc, stream, 1), what="the first stored")
    await publish(nc, subjects, record("after"))
    await eventually(lambda: _count_is(nc, stream, 2), what="the second stored")
    first, second = await stored(nc, stream)
    assert first.time < second.time
    later = await stored(nc, stream, since=(first.time + second.time) / 2)
    assert [schema.usage_decoder.decode(s.data).request_id for s in later] == ["after"]
    assert await stored(nc, stream, since=second.time + 60) == [], "nothing yet: no wait either"
    info = await nc.jetstream().stream_info(usage_stream.stream_name(stream))
    assert info.state.consumer_count == 0


async def test_reading_a_stream_that_does_not_exist_says_who_creates_it(nc, subjects):
    with pytest.raises(usage_stream.StreamNotFound, match="first router"):
        await stored(nc, usage_config(subjects))


# --- real workers -------------------------------------------------------------------------------


def chat(text: str = "hello there", **extra) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}], **extra})


async def test_each_request_a_worker_serves_is_one_record_in_the_stream(services, nc, subjects):
    config = make_config([{"id": "m"}], nats={"subject_prefix": subjects.prefix})
    await usage_stream.ensure(nc, config)
    try:
        await services.router(config)
        await services.worker(config, "m")
        client = await services.client()
        alice = schema.Identity(user="alice", kind="key", groups=["hpc"])
        answers = {}
        for i in range(3):
            rid = f"req{i}"
            answers[rid] = await client.complete(
                "m", "chat", chat(max_tokens=i + 2), request_id=rid, identity=alice
            )
        await eventually(lambda: _count_is(nc, config, 3), what="three records")
        js = nc.jetstream()
        name = usage_stream.stream_name(config)
        for seq in (1, 2, 3):
            msg = await js.get_msg(name, seq)
            r = schema.usage_decoder.decode(msg.data)
            assert msg.headers[usage_stream.MSG_ID] == f"{r.request_id}:0"
            assert r.outcome == "ok" and r.identity.user == "alice"
            assert r.completion_tokens == answers[r.request_id].usage.completion_tokens
        assert {
            schema.usage_decoder.decode((await js.get_msg(name, s)).data).request_id for s in (1, 2, 3)
        } == set(answers)
    finally:
        await nc.jetstream().delete_stream(usage_stream.stream_name(config))


async def test_a_request_whose_worker_stops_before_any_text_is_two_runs_and_one_request(
    services, nc, subjects
):
    slow_start = {"kind": "sim", "ttft_ms": 2000, "itl_ms": 1}
    fast = {"heartbeat_s": 0.2, "missed_heartbeats": 3, "dispatch_timeout_s": 0.5}
    config = make_config(
        [{"id": "m", "engine": slow_start}],
        nats={"subject_prefix": subjects.prefix},
        router=fast,
        worker={"heartbeat_s": 0.2},
    )
    await usage_stream.ensure(nc, config)
    try:
        await services.router(config)
        workers = {w.worker_id: w for w in [await services.worker(config, "m") for _ in range(2)]}
        client = await services.client()
        async with client.open("m", "chat", chat(max_tokens=3, stream=True), request_id="twice") as answer:
            chunks = answer.__aiter__()
            first = asyncio.create_task(anext(chunks))
            await eventually(lambda: answer.started is not None, what="a worker took it")
            await workers[answer.started.worker_id].stop()  # before its first token: Retry
            rest = [await asyncio.wait_for(first, 10)] + [c async for c in chunks]
        assert rest[-1].done
        await eventually(lambda: _count_is(nc, config, 2), what="two runs")
        records = [schema.usage_decoder.decode(s.data) for s in await stored(nc, config)]
        assert sorted((r.attempt, r.outcome) for r in records) == [(0, "retried"), (1, "ok")]
        report = Report("model", 0.0, "S")
        for r in records:
            report.add(r)
        assert report.groups["m"].as_dict()["requests"] == 1 and report.groups["m"].runs == 2
    finally:
        await nc.jetstream().delete_stream(usage_stream.stream_name(config))


# --- at router start ----------------------------------------------------------------------------


async def test_two_routers_starting_together_create_the_stream_and_both_run(tmp_path, nats_url, nc, subjects):
    fleet = Fleet(tmp_path, nats_url, subjects.prefix)
    fleet.configure([{"id": "m", "engine": {"kind": "sim"}}])
    fleet.config_path.write_text(fleet.config_path.read_text() + "\n[usage]\nretention_days = 14\n")
    fleet.config = load_config(fleet.config_path)
    name = usage_stream.stream_name(fleet.config)
    js = nc.jetstream()
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.stream_info(name)
    try:
        await fleet.start()
        first, second = await asyncio.gather(fleet.router("r1"), fleet.router("r2"))
        info = await js.stream_info(name)
        assert info.config.subjects == [subjects.usage] and info.config.max_age == 14 * 86_400
        for proc in (first, second):
            proc.check_alive()
            assert [e["stream"] for e in proc.events("usage_stream_ready")] == [name]
    finally:
        await fleet.close()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)


async def test_first_up_creates_the_stream_before_it_serves(tmp_path, nats_url, nc, subjects):
    text = (
        f'[nats]\nurl = "{nats_url}"\nsubject_prefix = "{subjects.prefix}"\n[usage]\nretention_days = 3\n'
        '[[clusters]]\nname = "a"\n[[models]]\nid = "m"\nengine = { kind = "sim" }\n'
    )
    stack = Stack(text, tmp_path)
    name = f"{subjects.prefix.upper()}_USAGE"
    try:
        await stack.start()
        info = await nc.jetstream().stream_info(name)
        assert info.config.subjects == [subjects.usage] and info.config.max_age == 3 * 86_400
    finally:
        await stack.stop()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(name)
