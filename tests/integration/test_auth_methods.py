"""``auth.methods = ["none"]`` as a user meets it: ``first gateway`` (a real child process) refuses
to serve an open API off loopback, with one line naming the setting, and serves it on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support import ROOT, eventually, free_port

pytestmark = pytest.mark.timeout(60)

REFUSAL = (
    'first gateway: auth.methods = ["none"] lets anyone who reaches {host} call the API as anyone: an open'
    ' gateway listens on loopback only (set auth.methods to "keys" and/or "globus")\n'
)


def write_config(tmp_path: Path, prefix: str, gateway: str = "") -> Path:
    path = tmp_path / "first.toml"
    path.write_text(
        f'[nats]\nsubject_prefix = "{prefix}"\n{gateway}'
        '[[clusters]]\nname = "a"\n[[models]]\nid = "m"\nengine = { kind = "sim" }\n'
    )  # no [auth]: methods defaults to ["none"]
    return path


@contextlib.asynccontextmanager
async def first_gateway(config: Path, nats_url: str, *args: str):
    """``first gateway`` as a child process, stopped (then killed) if it still runs at the end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "gateway", "--config", str(config), "--nats", nats_url, *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.mark.parametrize("where", ["--host", "gateway.host"])
async def test_an_open_gateway_off_loopback_is_refused_with_one_line_and_exit_2(tmp_path, subjects, where):
    """Refused before it listens or connects (the NATS URL here leads nowhere)."""
    if where == "--host":
        config, args = write_config(tmp_path, subjects.prefix), ["--host", "0.0.0.0"]
    else:
        config, args = write_config(tmp_path, subjects.prefix, '[gateway]\nhost = "0.0.0.0"\n'), []
    async with first_gateway(config, f"nats://127.0.0.1:{free_port()}", *args) as proc:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and out == b""
    assert err.decode() == REFUSAL.format(host="0.0.0.0")


async def test_an_open_gateway_on_loopback_serves(tmp_path, subjects, nats_url):
    port = free_port()
    config = write_config(tmp_path, subjects.prefix)
    async with (
        first_gateway(config, nats_url, "--host", "127.0.0.1", "--port", str(port)) as proc,
        aiohttp.ClientSession() as http,
    ):

        async def healthy() -> bool:
            assert proc.returncode is None, "first gateway exited"
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/health") as r:
                    return r.status == 200
            return False

        await eventually(healthy, timeout=30, what="first gateway to listen on loopback")
