"""Schemathesis against a running gateway: thousands of generated requests, never a 5xx, every error
in OpenAI's envelope, every answer as /openapi.json describes it.

The cases come from the gateway's own OpenAPI document, valid ones (half of them aimed at what
exists: a real model, so they reach a simulated engine and come back as JSON or SSE, and an uploaded
batch file, so that files and batches are made and read back) and ones that break the schema on
purpose (those must be refused with a 4xx). Failures are collected, not raised, so one
finding does not stop the run (nor start Hypothesis's shrinking); each comes with a curl line.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support import Stack

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(300)]

CASES = 3000
MODEL = "fuzz/sim"
FUZZ_STACK = """
[nats]
url = "{url}"
subject_prefix = "{prefix}"

[gateway]
request_timeout_s = 20
stall_timeout_s = 10

[worker]
heartbeat_s = 0.25

[[clusters]]
name = "fuzz"

[[models]]
id = "{model}"
capacity = 64
engine = {{ kind = "sim", ttft_ms = 0, itl_ms = 0, max_concurrency = 64 }}
scaling = {{ min_hot = 1, max_workers = 1 }}
"""
JSONL = orjson.dumps(
    {"custom_id": "fuzz", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}}
) + b"\n"  # fmt: skip
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
async def fuzz_stack(nats_url, tmp_path_factory):
    prefix = f"fuzz{uuid.uuid4().hex[:8]}"
    config = FUZZ_STACK.format(url=nats_url, prefix=prefix, model=MODEL)
    stack = Stack(config, tmp_path_factory.mktemp("fuzz"), name="fuzz")
    await stack.start(ready_models=[MODEL])
    yield stack
    assert await stack.stop() == 0, stack.log_tail()


def envelope_problem(response: schemathesis.Response) -> str | None:
    """Why an error response is not OpenAI's envelope, or None."""
    content_type = response.headers.get("content-type", [""])[0]  # lowercase keys, lists of values
    if not content_type.startswith("application/json"):
        return f"Content-Type {content_type!r}"
    try:
        error = orjson.loads(response.content)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "no `error` object"
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"error fields {sorted(error) if isinstance(error, dict) else error!r}"
    return None


def made(base_url: str, session: requests.Session) -> dict[str, str]:
    """A batch input file and a batch for valid cases to name, by their path parameter (batch mode
    opens in the background: polled until it answers)."""
    deadline = time.monotonic() + 30
    while True:
        form = {"file": ("fuzz.jsonl", JSONL)}
        r = session.post(base_url + "/v1/files", files=form, data={"purpose": "batch"}, timeout=30)
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]
    batch = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    r = session.post(base_url + "/v1/batches", json=batch, timeout=30)
    assert r.status_code == 200, r.text
    return {"file_id": file_id, "batch_id": r.json()["id"]}


def aim(case: schemathesis.Case, ids: dict[str, str]) -> None:
    """A valid case aimed at what exists: the served model, the file and batch made, JSONL to upload."""
    body = case.body
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = MODEL
        if isinstance(body.get("input_file_id"), str):
            body["input_file_id"] = ids["file_id"]
        if case.path == "/v1/files" and "file" in body:
            body["file"] = JSONL
    if case.method != "DELETE":  # the file stays for the others
        for name in set(case.path_parameters or {}) & set(ids):
            case.path_parameters[name] = ids[name]


def fuzz(base_url: str, cases: int) -> tuple[collections.Counter, list[str]]:
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    strategy = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )
    seen: collections.Counter = collections.Counter()
    failures: list[str] = []
    session = requests.Session()
    ids = made(base_url, session)

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, aimed=st.booleans())
    def one(case, aimed):
        if aimed and case.meta.generation.mode == GenerationMode.POSITIVE:
            aim(case, ids)
        response = case.call(base_url=base_url, session=session, timeout=30)
        seen[(case.method, case.path, response.status_code)] += 1
        try:
            case.validate_response(response, checks=CHECKS)
            if response.status_code >= 400 and (problem := envelope_problem(response)):
                raise AssertionError(f"{response.status_code} is not OpenAI's envelope: {problem}")
        except (AssertionError, schemathesis.errors.FailureGroup) as exc:
            failures.append(f"{case.method} {case.path} -> {response.status_code}: {str(exc)[:2000]}")

    one()
    return seen, failures


async def test_generated_requests_never_get_5xx_and_errors_are_openai_shaped(fuzz_stack):
    started = time.monotonic()
    seen, failures = await asyncio.to_thread(fuzz, fuzz_stack.base_url, CASES)
    elapsed = time.monotonic() - started
    total = sum(seen.values())
    statuses = collections.Counter(status for (_, _, status) in seen.elements())
    print(f"\nfuzz: {total} cases in {elapsed:.1f} s; statuses {dict(sorted(statuses.items()))}")
    assert not failures, f"{len(failures)} of {total} cases failed:\n\n" + "\n\n".join(failures[:5])
    assert not [s for s in statuses if s >= 500]
    assert total >= CASES * 0.9, f"only {total} cases ran"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/batches"):
        reached = {status for (m, p, status) in seen if p == path and m == "POST"}
        assert {200, 400, 404} <= reached, f"{path} was not fuzzed end to end: {reached}"
    for method, path, found in (
        ("POST", "/v1/files", {200}),
        ("GET", "/v1/files/{file_id}/content", {200}),
        ("POST", "/v1/batches/{batch_id}/cancel", {200, 409}),  # 409: the batch has completed
    ):
        reached = {status for (m, p, status) in seen if (m, p) == (method, path)}
        assert reached & found, f"{method} {path} never reached what exists: {reached}"
