"""Errors cross NATS as wire ``Error`` messages and come back as the same exception class."""

from __future__ import annotations

import pytest

from shared import errors, schema

CLASSES = [
    errors.FirstError,
    errors.BadRequest,
    errors.NotFound,
    errors.ModelNotFound,
    errors.PayloadTooLarge,
    errors.NoCapacity,
    errors.EngineError,
    errors.EngineTimeout,
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_round_trip_keeps_class_status_message_param_and_retry_after(cls):
    original = cls("something went wrong", param="messages[0]", retry_after_s=2.5)
    wire = schema.stream_decoder.decode(schema.encode(original.to_wire("r1")))
    back = errors.from_wire(wire)
    assert type(back) is cls
    assert (back.status, back.code, back.type) == (cls.status, cls.code, cls.type)
    assert (back.message, back.param, back.retry_after_s) == ("something went wrong", "messages[0]", 2.5)


def test_to_wire_carries_request_id_code_and_http_status():
    wire = errors.NoCapacity("no worker", retry_after_s=5.0).to_wire("req-9")
    assert (wire.request_id, wire.code, wire.status, wire.retry_after_s) == ("req-9", "no_capacity", 503, 5.0)


def test_codes_are_distinct_so_each_class_round_trips():
    assert len({cls.code for cls in CLASSES}) == len(CLASSES)


def test_subclass_relations_survive_so_callers_can_catch_broadly():
    back = errors.from_wire(errors.ModelNotFound("no such model", param="model").to_wire("r"))
    assert isinstance(back, errors.NotFound)
    assert back.status == 404


def test_unknown_code_from_a_newer_service_keeps_status_and_message():
    wire = schema.Error(
        request_id="r",
        code="quota_exceeded",
        message="over quota",
        status=429,
        param="user",
        retry_after_s=60,
    )
    back = errors.from_wire(wire)
    assert isinstance(back, errors.FirstError)
    assert (back.status, back.code, back.message, back.param, back.retry_after_s) == (
        429,
        "quota_exceeded",
        "over quota",
        "user",
        60,
    )
    assert str(back) == "over quota"


def test_unknown_code_does_not_change_the_class_defaults():
    errors.from_wire(schema.Error(request_id="r", code="weird", message="m", status=418))
    assert (errors.FirstError.status, errors.FirstError.code) == (500, "internal_error")
