"""A secured ``first up`` as a site runs it: API keys at the gateway, its embedded nats-server with
one user per role, and the commands an operator types against it with nothing but ``--config``.

What a user sees: a key made by ``first keys create`` works with the openai SDK, a model outside
the key's groups is invisible and refused, a NATS-native client listed in ``nats.clients`` is
served under its own name, and a connection without credentials is refused. What an operator sees:
``first usage`` counts both callers, the key survives a restart of the stack (the store is kept),
and the stack's own services never trip the server's permissions (no ``nats_permission_violation``
in its log: each such line would be a role in shared/natsauth.py missing something it needs).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import aiohttp
import nats
import nats.errors
import openai
import orjson
import pytest

from services.worker.engines.openai_server import free_port
from shared.client import FirstClient
from shared.connect import connect
from shared.subjects import Subjects
from tests.scrape import scrape, value
from tests.support import ROOT, Stack, eventually

CONFIG = """
[nats]
url = ""
subject_prefix = "sec"
embedded_store_dir = "store"
clients = [{ name = "alice", groups = ["lab"] }]

[auth]
methods = ["keys"]

[limits.user]
requests_per_s = 50

[scaler]
tick_s = 0.2

[worker]
heartbeat_s = 0.25

[[clusters]]
name = "c1"

[[models]]
id = "sim/open"
engine = { kind = "sim", ttft_ms = 1, itl_ms = 1 }
scaling = { min_hot = 1, max_workers = 1 }

[[models]]
id = "sim/staff"
allowed_groups = ["staff"]
engine = { kind = "sim", ttft_ms = 1, itl_ms = 1 }
scaling = { min_hot = 0, max_workers = 1 }
"""

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def first(stack: Stack, *args: str) -> tuple[int, str, str]:
    """``first <args> --config <the stack's>`` as an operator types it: no URL, no credentials."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, "--config", str(stack.config_path),
        cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def served(stack: Stack, key: str, model: str) -> None:
    async def answers() -> bool:
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key=key, max_retries=0)
        try:
            await client.chat.completions.create(model=model, **CHAT)
        except (openai.APIStatusError, openai.APIConnectionError):
            return False
        finally:
            await client.close()
        return True

    await eventually(answers, timeout=30, interval=0.2, what=f"{model} to answer")


def violations(stack: Stack) -> list[str]:
    return [line for line in stack.log_path.read_text().splitlines() if "nats_permission_violation" in line]


async def exporter_reads(stack: Stack) -> None:
    """``first exporter --config`` finds the stack's embedded server and reads it as ops."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "exporter", "--config", str(stack.config_path), "--port", str(port),
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:

        async def a_ready_worker() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                samples = await scrape(f"http://127.0.0.1:{port}/metrics")
                return (
                    value(samples, "first_workers", model="sim/open", cluster="c1", state="ready") or 0
                ) >= 1

        await eventually(a_ready_worker, timeout=20, interval=0.2, what="first exporter to see the worker")
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


@pytest.fixture
async def stack(tmp_path):
    stack = await Stack(CONFIG, tmp_path, name="secure").start()
    yield stack
    await stack.stop()


async def test_keys_native_clients_and_operators_on_a_secured_stack(stack, tmp_path):
    code, out, err = await first(stack, "keys", "create", "bob", "--groups", "lab")
    assert code == 0, err
    key = out.strip()
    await served(stack, key, "sim/open")

    oai = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key=key, max_retries=0, timeout=30)
    try:
        answer = await oai.chat.completions.create(model="sim/open", **CHAT)
        assert answer.choices[0].message.content
        assert [m.id for m in (await oai.models.list()).data] == ["sim/open"]
        with pytest.raises(openai.PermissionDeniedError):
            await oai.chat.completions.create(model="sim/staff", **CHAT)
        forged = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key=key[:-4] + "AAAA", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await forged.models.list()
        await forged.close()
    finally:
        await oai.close()

    store = tmp_path / "store"
    url = (store / "url").read_text().strip()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    nc = await connect(url, "alice", str(store / "credentials" / "alice.nk"))
    try:
        async with FirstClient(nc, Subjects("sec"), user="alice", request_timeout_s=30) as alice:
            body = orjson.dumps({"model": "sim/open", **CHAT})
            result = await alice.complete("sim/open", "chat", body)
            assert result.texts[0] and result.usage.completion_tokens == 4
    finally:
        await nc.close()

    async def both_counted() -> bool:
        code, out, err = await first(stack, "usage", "--json")
        assert code == 0, err
        users = {row["user"]: row["requests"] for row in orjson.loads(out)["rows"]}
        return users.get("bob", 0) >= 2 and users.get("alice") == 1

    await eventually(both_counted, timeout=10, interval=0.3, what="bob's and alice's usage records")
    await exporter_reads(stack)
    assert violations(stack) == []

    # The store outlives the stack: the same key works after a restart.
    assert await stack.stop() == 0
    assert not (store / "url").exists()
    await stack.start()
    await served(stack, key, "sim/open")
    assert violations(stack) == []
