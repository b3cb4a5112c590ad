"""``first usage`` as a real process against the test's nats-server: the numbers per user, model
and cluster in the table, the JSON and the CSV, the --since window, and one-line errors."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import io
import sys
from pathlib import Path

import nats.js.errors
import orjson
import pytest

from shared import schema, usage_stream
from shared.config import load_config
from shared.natsserver import EmbeddedNats
from tests.support import ROOT, eventually, free_port

pytestmark = pytest.mark.timeout(60)

ALICE = schema.Identity(user="alice", kind="key", name="Alice", groups=["hpc", "ml"], key_id="k1")
BOB = schema.Identity(user="bob", kind="globus", username="bob@anl.gov", idp="anl.gov")


def record(rid: str, identity=None, attempt: int = 0, **kw) -> schema.UsageRecord:
    fields = {"model": "llama", "endpoint": "chat", "worker_id": "w1", "cluster": "polaris", "outcome": "ok"}
    return schema.UsageRecord(request_id=rid, attempt=attempt, identity=identity, **{**fields, **kw})


RECORDS = [
    record("a1", ALICE, outcome="retried", prompt_tokens=10),
    record("a1", ALICE, attempt=1, prompt_tokens=10, completion_tokens=90, cluster="sophia"),
    record("a2", ALICE, prompt_tokens=20, completion_tokens=30),
    record("b1", BOB, model="mixtral", prompt_tokens=100, completion_tokens=400, cluster="sophia"),
    record("b2", BOB, model="mixtral", outcome="cancelled", prompt_tokens=5, completion_tokens=5),
    record("n1", None, outcome="engine_timeout", prompt_tokens=7),
]


def write_config(tmp_path: Path, subjects) -> Path:
    path = tmp_path / "first.toml"
    path.write_text(
        f'[nats]\nsubject_prefix = "{subjects.prefix}"\n'
        '[[clusters]]\nname = "polaris"\n[[clusters]]\nname = "sophia"\n'
        '[[models]]\nid = "llama"\nengine = { kind = "sim" }\n'
        '[[models]]\nid = "mixtral"\nengine = { kind = "sim" }\n'
    )
    return path


@pytest.fixture
async def deployment(tmp_path, nc, subjects):
    """A config on the test's prefix, its usage stream with RECORDS in it (each published twice,
    as a re-send would: the stream keeps one)."""
    path = write_config(tmp_path, subjects)
    config = load_config(path)
    await usage_stream.ensure(nc, config)
    for r in RECORDS:
        for _ in range(2):
            headers = {usage_stream.MSG_ID: usage_stream.msg_id(r.request_id, r.attempt)}
            await nc.publish(subjects.usage, schema.encode(r), headers=headers)
    await nc.publish(subjects.usage, b"not a usage record")  # anyone may publish on the subject
    name = usage_stream.stream_name(config)

    async def all_stored() -> bool:
        return (await nc.jetstream().stream_info(name)).state.messages == len(RECORDS) + 1

    await eventually(all_stored, what="the records stored")
    yield path
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await nc.jetstream().delete_stream(name)


async def first_usage(config: Path, nats_url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "usage", "--config", str(config), "--nats", nats_url, *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


def table_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()[2:]  # the summary line, a blank line
    return {cells[0]: cells[1:] for cells in (line.split() for line in lines) if not set(cells[0]) <= {"-"}}


async def test_by_user_the_table_counts_requests_runs_tokens_and_outcomes(deployment, nats_url):
    rc, out, err = await first_usage(deployment, nats_url, "--by", "user")
    assert rc == 0, err
    assert out.splitlines()[0].startswith("6 usage records since ")
    assert "1 undecodable messages skipped" in out.splitlines()[0]
    rows = table_rows(out)
    #                        requests runs prompt completion total ok failed cancelled retried
    assert rows["user"] == [
        "requests",
        "runs",
        "prompt",
        "completion",
        "total",
        "ok",
        "failed",
        "cancelled",
        "retried",
    ]
    assert rows["bob"] == ["2", "2", "105", "405", "510", "1", "0", "1", "0"]
    assert rows["alice"] == ["2", "3", "40", "120", "160", "2", "0", "0", "1"]
    assert rows["anonymous"] == ["1", "1", "7", "0", "7", "0", "1", "0", "0"]
    assert rows["total"] == ["5", "6", "152", "525", "677", "3", "1", "1", "1"]
    assert list(rows) == ["user", "bob", "alice", "anonymous", "total"], "most tokens first"


async def test_by_model_as_json(deployment, nats_url, subjects):
    rc, out, err = await first_usage(deployment, nats_url, "--by", "model", "--json")
    assert rc == 0, err
    got = orjson.loads(out)
    assert (got["by"], got["records"], got["skipped"]) == ("model", 6, 1)
    assert got["stream"] == f"{subjects.prefix.upper()}_USAGE"
    assert got["rows"] == [
        {"model": "mixtral", "requests": 2, "runs": 2, "prompt_tokens": 105, "completion_tokens": 405,
         "total_tokens": 510, "outcomes": {"ok": 1, "failed": 0, "cancelled": 1, "retried": 0}},
        {"model": "llama", "requests": 3, "runs": 4, "prompt_tokens": 47, "completion_tokens": 120,
         "total_tokens": 167, "outcomes": {"ok": 2, "failed": 1, "cancelled": 0, "retried": 1}},
    ]  # fmt: skip
    assert got["total"]["requests"] == 5 and got["total"]["runs"] == 6


async def test_by_cluster_a_request_retried_on_another_cluster_counts_in_both(deployment, nats_url):
    rc, out, err = await first_usage(deployment, nats_url, "--by", "cluster", "--json")
    assert rc == 0, err
    rows = {row["cluster"]: row for row in orjson.loads(out)["rows"]}
    assert (rows["sophia"]["requests"], rows["sophia"]["runs"], rows["sophia"]["total_tokens"]) == (2, 2, 600)
    assert (rows["polaris"]["requests"], rows["polaris"]["runs"], rows["polaris"]["total_tokens"]) == (
        4,
        4,
        77,
    )
    assert orjson.loads(out)["total"]["requests"] == 5


async def test_csv_has_one_line_per_record_with_every_field(deployment, nats_url):
    rc, out, err = await first_usage(deployment, nats_url, "--csv")
    assert rc == 0, err
    assert "skipped 1 messages" in err
    lines = list(csv.DictReader(io.StringIO(out)))
    assert [(line["request_id"], line["attempt"]) for line in lines] == [
        (r.request_id, str(r.attempt)) for r in RECORDS
    ]
    a1 = lines[1]
    assert (a1["user"], a1["identity_kind"], a1["identity_name"], a1["groups"], a1["key_id"]) == (
        "alice", "key", "Alice", "hpc;ml", "k1"
    )  # fmt: skip
    assert (a1["cluster"], a1["outcome"], a1["prompt_tokens"], a1["completion_tokens"]) == (
        "sophia",
        "ok",
        "10",
        "90",
    )
    assert (lines[3]["username"], lines[3]["idp"]) == ("bob@anl.gov", "anl.gov")
    assert (lines[5]["user"], lines[5]["identity_kind"]) == ("anonymous", "anonymous")
    assert all(datetime.datetime.fromisoformat(line["time"]).tzinfo for line in lines)


async def test_by_with_csv_is_the_table_as_csv(deployment, nats_url):
    rc, out, err = await first_usage(deployment, nats_url, "--by", "model", "--csv")
    assert rc == 0, err
    assert "skipped 1 messages" in err
    assert list(csv.reader(io.StringIO(out))) == [
        ["model", "requests", "runs", "prompt_tokens", "completion_tokens", "total_tokens",
         "ok", "failed", "cancelled", "retried"],
        ["mixtral", "2", "2", "105", "405", "510", "1", "0", "1", "0"],
        ["llama", "3", "4", "47", "120", "167", "2", "1", "0", "1"],
    ]  # fmt: skip


async def test_since_leaves_out_older_records(deployment, nats_url, nc, subjects):
    config = load_config(deployment)
    newest = [s async for s in usage_stream.read(nc, config, 0.0)][-1]
    await nc.publish(subjects.usage, schema.encode(record("late", BOB, prompt_tokens=1, completion_tokens=2)))
    name = usage_stream.stream_name(config)

    async def stored() -> bool:
        return (await nc.jetstream().stream_info(name)).state.messages == len(RECORDS) + 2

    await eventually(stored, what="the late record stored")
    since = datetime.datetime.fromtimestamp(newest.time + 0.0005, datetime.UTC).isoformat()
    rc, out, err = await first_usage(deployment, nats_url, "--since", since, "--json")
    assert rc == 0, err
    got = orjson.loads(out)
    assert got["records"] == 1 and got["rows"][0]["user"] == "bob" and got["total"]["total_tokens"] == 3
    rc, out, _ = await first_usage(deployment, nats_url, "--since", "1h", "--json")
    assert orjson.loads(out)["records"] == len(RECORDS) + 1


# --- errors: one line on stderr, exit status 2 ----------------------------------------------------


async def test_unreachable_nats_is_one_line_and_exit_2(deployment):
    rc, out, err = await first_usage(deployment, f"nats://127.0.0.1:{free_port()}")
    assert rc == 2 and out == ""
    assert err.startswith("first usage: cannot reach NATS at nats://127.0.0.1:") and err.count("\n") == 1


async def test_a_missing_stream_is_one_line_and_exit_2(tmp_path, nats_url, subjects):
    path = write_config(tmp_path, subjects)
    rc, out, err = await first_usage(path, nats_url)
    assert rc == 2 and out == ""
    assert err == f"first usage: no usage stream {subjects.prefix.upper()}_USAGE on this NATS server:" \
        " `first up` or a `first router` creates it\n"  # fmt: skip


async def test_a_bad_since_is_one_line_and_exit_2(deployment, nats_url):
    rc, _, err = await first_usage(deployment, nats_url, "--since", "last week")
    assert rc == 2 and err.count("\n") == 1 and "give a duration (7d, 12h, 30m)" in err


async def test_a_server_without_jetstream_stops_first_usage_and_a_router_with_one_line(tmp_path, subjects):
    conf = tmp_path / "plain.conf"
    conf.write_text(f"host: 127.0.0.1\nport: {free_port()}\n")  # no jetstream block
    path = write_config(tmp_path, subjects)
    async with EmbeddedNats(config_file=str(conf)) as server:
        rc, _, err = await first_usage(path, server.url)
        assert rc == 2 and err.count("\n") == 1 and "JetStream is not enabled" in err
        router = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "router", "--config", str(path), "--nats", server.url,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(router.communicate(), 30)
        assert router.returncode == 2
        said = [line for line in err.decode().splitlines() if line.startswith("first router: ")]
        assert len(said) == 1 and said[0].startswith("first router: usage stream: ")
        assert "JetStream is not enabled" in said[0]
