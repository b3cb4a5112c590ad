"""Wire messages: msgpack round trips, tagged unions, and tolerance of older and newer senders."""

from __future__ import annotations

import msgspec
import pytest

from shared import schema

REQUEST = schema.InferRequest(
    request_id="r1",
    model="m",
    endpoint="chat",
    body=b'{"messages": [{"role": "user", "content": "h\xc3\xa9"}]}\x00\xff',
    reply_to="first.v1.reply.c.r1",
    created=1700000000.5,
    queue_timeout_s=12.0,
)

MESSAGES = [
    (REQUEST, schema.infer_decoder),
    (schema.Cancel(request_id="r1", reason="timeout"), schema.cancel_decoder),
    (schema.DispatchReply(accepted=False, reason="full", in_flight=3), schema.dispatch_reply_decoder),
    (schema.Cancel(request_id="r1", reason="superseded", attempt=2), schema.cancel_decoder),
    (schema.RouterBeat(router_id="rt", interval_s=1.0, held=4, sent=5.0), schema.router_beat_decoder),
    (schema.RunsBeat(worker_id="w1", interval_s=2.0, runs=["r1:0", "r2:1"]), schema.runs_beat_decoder),
    (
        schema.UsageRecord(
            request_id="r1",
            model="m",
            endpoint="chat",
            worker_id="w1",
            cluster="c",
            outcome="cancelled",
            prompt_tokens=5,
            completion_tokens=3,
            ttft_s=0.25,
            duration_s=1.5,
            attempt=1,
        ),
        schema.usage_decoder,
    ),
    (
        schema.Heartbeat(
            worker_id="w1",
            cluster="polaris",
            model="m",
            state="ready",
            capacity=4,
            in_flight=2,
            interval_s=2.0,
            idle_s=0.5,
            engine=schema.EngineLoad(running=2, waiting=1, kv_cache_usage=0.25),
            node_id="n1",
            sent=123.0,
        ),
        schema.heartbeat_decoder,
    ),
    (schema.Demand(router_id="rt", model="m", queued=3, oldest_wait_s=1.5), schema.demand_decoder),
    (
        schema.AdmittedRequests(
            gateway_id="gw-1", counts=[schema.Admitted("alice", 3, "m"), schema.Admitted("bob", 1)]
        ),
        schema.admitted_decoder,
    ),
    (schema.StatusRequest(), schema.status_request_decoder),
    (
        schema.StatusReply(
            router_id="rt",
            models=[
                schema.ModelStatus(
                    id="m",
                    state="live",
                    clusters=["a", "b"],
                    queued=1,
                    nodes_starting=1,
                    workers=[schema.WorkerInfo("w1", "a", "ready", 4, 1)],
                )
            ],
        ),
        schema.status_reply_decoder,
    ),
]


@pytest.mark.parametrize(("msg", "decoder"), MESSAGES, ids=lambda v: type(v).__name__)
def test_every_message_round_trips_through_its_decoder(msg, decoder):
    assert decoder.decode(schema.encode(msg)) == msg


def test_request_body_bytes_travel_unchanged():
    assert schema.infer_decoder.decode(schema.encode(REQUEST)).body == REQUEST.body


STREAM = [
    schema.Started(request_id="r", worker_id="w", cluster="c"),
    schema.Chunk(
        request_id="r",
        seq=3,
        deltas=[schema.Delta(text="Hel"), schema.Delta(text="lo", index=0, finish_reason="stop")],
        usage=schema.Usage(prompt_tokens=5, completion_tokens=2),
        done=True,
    ),
    schema.Chunk(request_id="r", seq=0),
    schema.Error(request_id="r", code="no_capacity", message="busy", status=503, retry_after_s=5.0),
    schema.Accepted(request_id="r", router_id="rt", queued=2, interval_s=0.5, attempt=1),
    schema.Retry(request_id="r", attempt=2, reason="router stopping"),
]


@pytest.mark.parametrize("msg", STREAM, ids=lambda v: type(v).__name__)
def test_stream_decoder_returns_the_class_that_was_sent(msg):
    decoded = schema.stream_decoder.decode(schema.encode(msg))
    assert type(decoded) is type(msg)
    assert decoded == msg


def test_stream_decoder_refuses_a_message_of_another_kind():
    with pytest.raises(msgspec.ValidationError):
        schema.stream_decoder.decode(schema.encode(schema.Cancel(request_id="r")))


@pytest.mark.parametrize(
    "hostile",
    [
        {"worker_id": "a.b"},  # would become two subject tokens
        {"worker_id": "w>"},
        {"cluster": ""},
        {"capacity": 0},  # a division by zero in the routing choice, once
        {"capacity": -3},
        {"in_flight": -1},
        {"interval_s": float("nan")},
        {"interval_s": float("inf")},
        {"interval_s": 0.0},
        {"engine": {"kv_cache_usage": float("nan")}},
        {"engine": {"waiting": -2}},
    ],
    ids=repr,
)
def test_a_heartbeat_that_could_break_a_router_fails_to_decode(hostile):
    fields = {"kind": "heartbeat", "worker_id": "w", "cluster": "c", "model": "m", "state": "ready"}
    fields |= {"capacity": 2, "in_flight": 0, "interval_s": 1.0} | hostile
    with pytest.raises(msgspec.ValidationError):
        schema.heartbeat_decoder.decode(msgspec.msgpack.encode(fields))


@pytest.mark.parametrize("field", ["request_id", "reply_to"])
@pytest.mark.parametrize("value", ["", "a b", "x" * 600, "a..b", "a.>"])
def test_an_infer_request_whose_ids_cannot_be_subjects_fails_to_decode(field, value):
    fields = {"kind": "infer", "request_id": "r", "model": "m", "endpoint": "chat", "body": b"{}"}
    fields |= {"reply_to": "p.v1.reply.c.r", "created": 1.0, field: value}
    with pytest.raises(msgspec.ValidationError):
        schema.infer_decoder.decode(msgspec.msgpack.encode(fields))


def test_every_message_carries_its_kind_tag():
    raw = msgspec.msgpack.decode(schema.encode(schema.Cancel(request_id="r")))
    assert raw["kind"] == "cancel"


def test_message_from_a_newer_sender_with_an_unknown_field_still_decodes():
    data = msgspec.msgpack.encode(
        {
            "kind": "heartbeat",
            "worker_id": "w1",
            "cluster": "c",
            "model": "m",
            "state": "ready",
            "capacity": 2,
            "in_flight": 0,
            "interval_s": 1.0,
            "gpu_temperature": 71,  # added in some later release
            "engine": {"running": 0, "future_gauge": 1.0},
        }
    )
    beat = schema.heartbeat_decoder.decode(data)
    assert (beat.worker_id, beat.capacity, beat.engine.running) == ("w1", 2, 0)


def test_union_member_with_an_unknown_field_still_decodes_to_its_class():
    data = msgspec.msgpack.encode(
        {"kind": "chunk", "request_id": "r", "seq": 1, "deltas": [{"text": "x"}], "trace": "abc"}
    )
    chunk = schema.stream_decoder.decode(data)
    assert isinstance(chunk, schema.Chunk)
    assert chunk.deltas == [schema.Delta(text="x")]


def test_message_from_an_older_sender_missing_defaulted_fields_decodes_with_defaults():
    data = msgspec.msgpack.encode(
        {
            "kind": "infer",
            "request_id": "r",
            "model": "m",
            "endpoint": "completion",
            "body": b"{}",
            "reply_to": "x",
            "created": 1.0,
        }
    )
    request = schema.infer_decoder.decode(data)
    assert request.queue_timeout_s == 0.0
    beat = schema.heartbeat_decoder.decode(
        msgspec.msgpack.encode(
            {
                "kind": "heartbeat",
                "worker_id": "w",
                "cluster": "c",
                "model": "m",
                "state": "loading",
                "capacity": 1,
                "in_flight": 0,
                "interval_s": 1.0,
            }
        )
    )
    assert beat.engine == schema.EngineLoad()
    assert (beat.node_id, beat.idle_s) == ("", 0.0)


def test_missing_required_field_is_refused():
    data = msgspec.msgpack.encode({"kind": "cancel"})
    with pytest.raises(msgspec.ValidationError, match="request_id"):
        schema.cancel_decoder.decode(data)


def test_defaults_are_left_off_the_wire():
    """omit_defaults keeps heartbeats and chunks small: only what differs from the default is sent."""
    raw = msgspec.msgpack.decode(schema.encode(schema.Chunk(request_id="r", seq=0)))
    assert raw == {"kind": "chunk", "request_id": "r", "seq": 0}


@pytest.mark.parametrize(
    "hostile",
    [
        {"gateway_id": "a.b"},
        {"counts": [{"user": "u", "requests": -1}]},
        {"counts": [{"user": "u" * 257, "requests": 1}]},
        {"counts": [{"user": "u", "requests": 1}] * 10_001},  # bounded, whatever the sender
    ],
)
def test_admitted_requests_refuse_what_would_corrupt_the_counts(hostile):
    raw = {"kind": "admitted", "gateway_id": "gw", **hostile}
    with pytest.raises(msgspec.ValidationError):
        schema.admitted_decoder.decode(msgspec.msgpack.encode(raw))


def test_an_event_is_json_that_nats_sub_shows_as_text_and_keeps_its_data():
    from shared import events

    event = schema.Event(
        kind="node", name="failed", time=1.5, source="scaler", cluster="c", model="m", node_id="n1",
        reason="x", data={"provider": "slurm", "job": {"id": "42"}},
    )  # fmt: skip
    raw = events.encode(event)
    assert raw.startswith(b'{"kind":"node","name":"failed"')
    assert events.decode(raw) == event


@pytest.mark.parametrize(
    "raw",
    [b"\x81\xa4kind\xa4node", b'{"kind":"no de","name":"x","time":1,"source":"s"}',
     b'{"kind":"node","name":"x","time":1,"source":"a.b"}', b'{"kind":"node"}'],
)  # fmt: skip
def test_a_malformed_event_fails_to_decode(raw):
    import msgspec

    from shared import events

    with pytest.raises(msgspec.DecodeError):
        events.decode(raw)
