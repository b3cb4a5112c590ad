"""``first keys create|list|revoke`` as an operator runs it: ``python -m services.cli keys ...`` in a
child process against the session's nats-server, its output and exit status read as a script
would read them; and a gateway in this process that takes and refuses what the command did."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import aiohttp
import msgspec
import pytest

from services.gateway.app import create_app, start_site
from shared import keystore
from shared.config import load_config
from shared.natsserver import find_binary
from tests.support import ROOT, eventually, free_port


class Keys:
    """``first keys`` on one config (and so one bucket) of the test's own."""

    def __init__(self, tmp_path, nats_url: str):
        self.prefix = f"kc{uuid.uuid4().hex[:10]}"
        self.config_path = tmp_path / "first.toml"
        self.config_path.write_text(
            f'[nats]\nsubject_prefix = "{self.prefix}"\n\n[auth]\nmethods = ["keys"]\n'
            # The tests poll a key before it exists 100 times a second: with the bound on failed
            # credentials per address (tests/integration/test_auth_flood.py), the revoked key would
            # then get 429 for the rest of the minute instead of its 401.
            "max_failures_per_min = 0\n"
        )
        self.config = load_config(str(self.config_path))
        self.nats_url = nats_url

    async def __call__(self, *args: str, nats_url: str | None = None) -> tuple[int, str, str]:
        """``(exit status, stdout, stderr)``."""
        url = self.nats_url if nats_url is None else nats_url
        nats_args = ["--nats", url] if url else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "keys", *args, "--config", str(self.config_path), *nats_args,
            cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode, out.decode(), err.decode()

    async def create(self, *args: str) -> tuple[str, str]:
        """A key made by the command: ``(key, id)``."""
        code, out, err = await self("create", *args)
        assert code == 0, err
        key_id, _ = keystore.parse(out.strip())
        return out.strip(), key_id

    async def bucket(self, nc):
        return await keystore.open_bucket(nc.jetstream(), keystore.bucket_name(self.config), create=False)


@pytest.fixture
def keys(tmp_path, nats_url) -> Keys:
    return Keys(tmp_path, nats_url)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("first keys: "), err
    return lines[0]


async def test_create_prints_the_key_once_and_the_bucket_keeps_only_its_digest(keys, nc):
    """stdout is the key alone (for scripts); stderr says it is shown only this once; the
    bucket entry has the name, the groups and the expiry, and no trace of the secret."""
    began = time.time()
    code, out, err = await keys("create", "alice", "--groups", "physics, chem", "--expires", "30d")
    assert code == 0, err
    key = out.strip()
    assert out == key + "\n" and keystore.parse(key) is not None
    key_id, secret = keystore.parse(key)
    assert "only time the key is shown" in err and key_id in err and secret not in err

    kv = await keys.bucket(nc)
    entry = await kv.get(key_id)
    assert secret.encode() not in entry.value
    record = keystore.decode(entry.value)
    assert (record.name, record.groups, record.revoked) == ("alice", ["physics", "chem"], False)
    assert record.secret_sha256 == keystore.digest(secret).hex()
    assert began + 30 * 86400 - 1 <= record.expires <= time.time() + 30 * 86400


async def test_list_shows_every_key_and_its_state_and_never_a_secret_or_digest(keys, nc):
    (alice, alice_id), (bob, bob_id) = await asyncio.gather(
        keys.create("alice", "--groups", "a,b"), keys.create("bob", "--expires", "12h")
    )
    kv = await keys.bucket(nc)
    old_key, old_id, old_secret = keystore.new_key()
    await kv.create(
        old_id,
        keystore.encode(
            keystore.KeyRecord(
                name="old", secret_sha256=keystore.digest(old_secret).hex(), created=1, expires=2
            )
        ),
    )
    code, _, err = await keys("revoke", "bob")
    assert code == 0, err

    (code, table, err), (jcode, jout, jerr) = await asyncio.gather(keys("list"), keys("list", "--json"))
    assert code == jcode == 0 and err == jerr == ""
    for out in (table, jout):
        for key in (alice, bob, old_key):
            key_id, secret = keystore.parse(key)
            assert key_id in out and secret not in out
            digest = (await keystore.fetch(kv, key_id)).record.secret_sha256
            assert digest not in out

    lines = table.splitlines()
    assert lines[0].split() == ["ID", "NAME", "GROUPS", "CREATED", "EXPIRES", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[alice_id][1:3] == ["alice", "a,b"] and rows[alice_id][4:] == ["never", "active"]
    assert rows[bob_id][-1] == "revoked"
    assert rows[old_id][-2:] == ["1970-01-01T00:00:02Z", "expired"]

    listed = {row["id"]: row for row in map(msgspec.json.decode, jout.splitlines())}
    assert set(listed) == {alice_id, bob_id, old_id}
    assert listed[alice_id] == {
        "id": alice_id,
        "name": "alice",
        "groups": ["a", "b"],
        "created": listed[alice_id]["created"],
        "expires": None,
        "state": "active",
    }
    assert listed[bob_id]["state"] == "revoked" and listed[bob_id]["expires"].endswith("Z")


async def test_revoke_takes_an_id_a_name_or_the_whole_key_and_refuses_an_ambiguous_name(keys, nc):
    """A name shared by two live keys is an error (exit 2) that lists both ids; by id it works,
    and then the name is no longer ambiguous. Revoking twice is fine; an unknown name is exit 2."""
    (_, id1), (_, id2), (k3, id3) = await asyncio.gather(
        keys.create("svc"), keys.create("svc"), keys.create("other")
    )
    code, out, err = await keys("revoke", "svc")
    line = one_line(err)
    assert code == 2 and out == "" and id1 in line and id2 in line and "by its id" in line

    code, out, err = await keys("revoke", id1)
    assert (code, err) == (0, "") and f"Revoked key {id1}" in out
    code, out, err = await keys("revoke", "svc")
    assert (code, err) == (0, "") and f"Revoked key {id2}" in out
    code, out, err = await keys("revoke", k3)  # the whole key, as a user may paste it
    assert (code, err) == (0, "") and f"Revoked key {id3}" in out and keystore.parse(k3)[1] not in out
    code, out, _ = await keys("revoke", id1)
    assert code == 0 and "revoked already" in out

    kv = await keys.bucket(nc)
    assert all([(await keystore.fetch(kv, i)).record.revoked for i in (id1, id2, id3)])
    code, out, err = await keys("revoke", "nobody")
    assert code == 2 and "no key has the id or the name 'nobody'" in one_line(err)


async def test_a_running_gateway_takes_a_key_the_command_made_and_refuses_it_once_revoked(keys, nats_url):
    """Within a second of the command's exit, both ways."""
    runner = await start_site(create_app(keys.config, nats_url), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/whoami"
    try:
        async with aiohttp.ClientSession() as http:

            async def status(key: str) -> int:
                async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
                    return r.status

            key, key_id = await keys.create("erin", "--groups", "g")
            made = time.monotonic()
            await eventually(lambda: _is(status(key), 200), timeout=1, interval=0.01, what="the new key")
            assert time.monotonic() - made < 1
            code, _, err = await keys("revoke", key_id)
            assert code == 0, err
            revoked = time.monotonic()
            await eventually(lambda: _is(status(key), 401), timeout=1, interval=0.01, what="the revocation")
            assert time.monotonic() - revoked < 1
    finally:
        await runner.cleanup()


async def _is(status, expected: int) -> bool:
    return await status == expected


async def test_no_nats_no_jetstream_and_bad_arguments_are_one_line_and_exit_2(keys, tmp_path):
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        find_binary(), "-a", "127.0.0.1", "-p", str(port), stderr=asyncio.subprocess.PIPE
    )  # JetStream off
    try:
        while b"Server is ready" not in await asyncio.wait_for(server.stderr.readline(), 10):
            pass
        results = await asyncio.gather(
            keys("list", nats_url=f"nats://127.0.0.1:{free_port()}"),
            keys("create", "a", nats_url=f"nats://127.0.0.1:{port}"),
            keys("list", nats_url=""),  # none in the config either
            keys("create", "a", "--expires", "soon"),
            keys("create", "a\tb"),
        )
    finally:
        server.terminate()
        await server.wait()
    expected = [
        "cannot reach NATS at nats://127.0.0.1:",
        "has JetStream off",
        "needs a NATS URL",
        "like 30d",
        "name",
    ]
    for (code, out, err), says in zip(results, expected, strict=True):
        assert code == 2 and out == "", (says, out, err)
        assert says in one_line(err)


async def test_list_before_any_key_is_made_is_an_empty_table_and_creates_nothing(keys, nc):
    code, out, err = await keys("list")
    assert (code, out.split(), err) == (0, ["ID", "NAME", "GROUPS", "CREATED", "EXPIRES", "STATE"], "")
    assert await keys.bucket(nc) is None
