"""Session affinity on a fake clock: a session's next request goes to its last worker while that
worker can take it, and to the usual choice otherwise; the gateway's session key."""

from __future__ import annotations

import orjson
import pytest

from services.router.affinity import Sessions
from services.router.registry import Registry
from shared import errors, schema
from shared.openai_protocol import ChatCompletionRequest, parse_request, session_key
from tests.unit.test_routing import Clock, beat


def request(session: str, model: str = "m") -> schema.InferRequest:
    return schema.InferRequest("r", model, "chat", b"{}", "x", 0.0, session=session)


def test_a_session_returns_to_its_worker_only_while_that_worker_can_take_it():
    clock = Clock()
    registry = Registry(clock=clock)
    for wid in ("a", "b"):
        registry.observe(beat(wid, capacity=1))
    sessions = Sessions(registry)
    assert sessions.preferred(request("s")) is None  # a new session: the usual choice
    sessions.served(request("s"), "b")
    assert sessions.preferred(request("s")).worker_id == "b"
    assert sessions.preferred(request("")) is None and sessions.preferred(request("s", model="n")) is None
    registry.dispatched("b")  # full now
    assert sessions.preferred(request("s")) is None
    registry.answered("b", 0)
    registry.maintenance = {"c"}
    assert sessions.preferred(request("s")) is None
    registry.maintenance = set()
    clock.now += 2.0  # its heartbeat is stale (1.5 intervals)
    assert sessions.preferred(request("s")) is None


def test_sessions_are_bounded_least_recently_used_first():
    registry = Registry()
    registry.observe(beat("a"))
    sessions = Sessions(registry, size=2)
    for s in ("s1", "s2", "s1", "s3"):
        sessions.served(request(s), "a")
    assert sessions.preferred(request("s1")) is not None and sessions.preferred(request("s2")) is None


def chat(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(orjson.dumps(body), ChatCompletionRequest)


def test_the_session_key_is_firsts_header_then_prompt_cache_key_then_user():
    assert session_key("conv-42", chat(prompt_cache_key="k", user="u")) == "conv-42"
    assert session_key(None, chat(prompt_cache_key="k", user="u")) == "k"
    assert session_key(None, chat(user="u")) == "u"
    assert session_key(None, chat()) == ""
    for bad in ("", "x" * 129, "has space", "é"):
        with pytest.raises(errors.BadRequest, match="X-ALCF-Session-ID"):
            session_key(bad, chat())
