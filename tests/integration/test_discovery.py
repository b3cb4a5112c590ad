"""Discovery through NATS's service API (shared/discovery.py), on a real nats-server with the
permissions ``first up`` writes (shared/natsauth.py): each service, on its own credentials,
answers an operator's ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` with its name, version,
endpoints and counters, and its ``status`` endpoint answers; a service's answers go to an inbox
only, whatever reply subject a request names; the ops user may ask only the service API's forms.
"""

from __future__ import annotations

import contextlib

import msgspec
import nats
import orjson
import pytest

from services.gateway import keys
from services.gateway.app import create_app, start_site
from services.router.service import Router
from services.scaler.service import Scaler
from services.worker.engines import make_engine
from services.worker.service import Worker
from shared import config as cfg
from shared import discovery, natsauth
from shared.client import FirstClient
from shared.connect import close, connect, credential_options
from shared.natsserver import EmbeddedNats
from shared.subjects import Subjects
from tests.support import eventually

PREFIX = "disc"
S = Subjects(PREFIX)
SERVICES = ["first-gateway", "first-router", "first-scaler", "first-worker"]
CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})


def _config() -> cfg.Config:
    config = msgspec.convert(
        {
            "nats": {"subject_prefix": PREFIX, "clients": [{"name": "alice"}]},
            "clusters": [{"name": "a", "max_nodes": 2}],
            "models": [{"id": "m", "engine": {"kind": "sim", "ttft_ms": 1, "itl_ms": 1}}],
            "worker": {"heartbeat_s": 0.2},
        },
        cfg.Config,
    )
    cfg.validate(config)
    return config


@pytest.fixture(scope="module")
async def server(tmp_path_factory):
    config = _config()
    directory = tmp_path_factory.mktemp("discovery")
    credentials = natsauth.write_credentials(directory / "credentials", natsauth.roles(config))
    conf = directory / "server.conf"
    conf.write_bytes(natsauth.server_config(credentials, host="127.0.0.1", port=-1, store_dir=str(directory)))
    async with EmbeddedNats(config_file=str(conf), users=credentials.public_keys()) as srv:
        yield srv.url, credentials, config


@pytest.fixture
async def deployment(server):
    """Gateway, router, scaler and one worker (slot a-n0), each as its own NATS user; yields a
    connection as ops and the worker."""
    url, credentials, config = server
    seed = lambda role: str(credentials.seed_file(role))  # noqa: E731
    async with contextlib.AsyncExitStack() as stack:

        async def connected(role: str):
            nc = await connect(url, f"test-{role}", seed(role))
            stack.push_async_callback(close, nc)
            return nc

        await stack.enter_async_context(Router(await connected("router"), S, config))
        await stack.enter_async_context(Scaler(await connected("scaler"), S, config, {}))
        model = config.model("m")
        worker = Worker(
            await connected("a-n0"), S, config.worker, model, "a", make_engine(model), worker_id="a-n0"
        )
        await stack.enter_async_context(worker)
        app = create_app(config, url, credentials=seed("gateway"))
        runner = await start_site(app, "127.0.0.1", 0)
        stack.push_async_callback(runner.cleanup)
        yield await connected("ops"), worker, app


def by_name(answers: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for a in answers:
        out.setdefault(a["name"], []).append(a)
    return out


async def test_every_service_answers_ping_info_and_stats_with_its_counters(deployment, server):
    ops, worker, app = deployment
    url, credentials, _ = server
    pings = by_name(await discovery.ask(ops, "PING", prefix=PREFIX))
    assert sorted(pings) == SERVICES
    for name, [ping] in pings.items():
        assert ping["version"] == discovery.version() != "0.0.0", name
        assert ping["metadata"]["prefix"] == PREFIX and ping["metadata"]["pid"]
    assert (
        pings["first-worker"][0]["metadata"] | {"worker_id": "a-n0", "cluster": "a", "model": "m"}
        == (pings["first-worker"][0]["metadata"])
    )
    assert pings["first-gateway"][0]["metadata"]["client_id"] == app[keys.CLIENT].client_id

    infos = by_name(await discovery.ask(ops, "INFO", prefix=PREFIX))
    assert sorted(infos) == SERVICES
    for name, [info] in infos.items():
        assert [e["name"] for e in info["endpoints"]] == ["status"], name
        assert info["description"].startswith("FIRST ")
    assert infos["first-worker"][0]["endpoints"][0]["subject"] == S.service_status("first-worker", "a-n0")

    # One request, as a NATS-native caller: the router counts a dispatch, the worker a run.
    alice_nc = await connect(url, "alice", str(credentials.seed_file("alice")))
    try:
        async with FirstClient(alice_nc, S, user="alice", request_timeout_s=10) as alice:
            assert (await alice.complete("m", "chat", CHAT)).usage.completion_tokens == 3
    finally:
        await close(alice_nc)

    async def counted() -> dict | None:
        stats = by_name(await discovery.ask(ops, "STATS", prefix=PREFIX))
        data = {name: s[0]["endpoints"][0]["data"] for name, s in stats.items()}
        ok = (
            data.get("first-router", {}).get("requests_dispatched") == 1
            and data["first-worker"]["served"] == 1
        )
        return data if ok else None

    data = await eventually(counted, timeout=10, what="the router's dispatch and the worker's run in STATS")
    assert sorted(data) == SERVICES
    expected = {"state": "ready", "in_flight": 0, "capacity": worker.model.capacity}
    assert data["first-worker"] | expected == data["first-worker"]
    assert data["first-router"]["workers"] == 1 and data["first-router"]["models"] == ["m"]
    assert data["first-gateway"] == {"requests_in_flight": 0, "models": ["m"]}
    assert data["first-scaler"]["clusters"] == []

    # The status endpoint of one instance: its counters, asked by its subject.
    reply = await ops.request(S.service_status("first-worker", "a-n0"), b"", timeout=5)
    assert orjson.loads(reply.data) | {"name": "first-worker", "served": 1} == orjson.loads(reply.data)


async def test_a_stopped_worker_is_no_longer_listed(deployment):
    ops, worker, _ = deployment
    names = lambda answers: [a["metadata"].get("worker_id") for a in answers]  # noqa: E731
    assert names(await discovery.ask(ops, "PING", name="first-worker", prefix=PREFIX)) == ["a-n0"]
    await worker.stop()
    assert await discovery.ask(ops, "PING", name="first-worker", prefix=PREFIX, timeout_s=0.5) == []
    assert sorted(by_name(await discovery.ask(ops, "PING", prefix=PREFIX))) == [
        "first-gateway", "first-router", "first-scaler",
    ]  # fmt: skip


async def test_answers_go_to_an_inbox_only(deployment, server):
    """A request whose reply subject is one of the deployment's own subjects gets no answer there:
    the server would let the services publish it (allow_responses)."""
    ops, *_ = deployment
    url, credentials, _ = server
    admin = await connect(url, "test-admin", str(credentials.seed_file("admin")))
    try:
        aimed: list[str] = []

        async def seen(msg) -> None:
            aimed.append(msg.subject)

        await admin.subscribe(S.infer, cb=seen)
        for verb in ("PING", "INFO", "STATS"):
            await admin.publish(f"$SRV.{verb}", b"", reply=S.infer)
        await admin.publish(S.service_status("first-worker", "a-n0"), b"", reply=S.infer)
        await admin.flush()
        # Each service handles its requests in order: once they answer these, they saw those.
        for verb in ("PING", "INFO", "STATS"):
            assert len(await discovery.ask(admin, verb, prefix=PREFIX)) == 4
        await ops.request(S.service_status("first-worker", "a-n0"), b"", timeout=5)
        await admin.flush()
        assert aimed == []
    finally:
        await close(admin)


async def test_ops_may_ask_the_service_api_and_nothing_else_under_it(server):
    url, credentials, _ = server
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(
        url, error_cb=on_error, allow_reconnect=False, **credential_options(str(credentials.seed_file("ops")))
    )
    try:
        await nc.publish("$SRV.PING", b"")  # allowed: any violation for it comes before the others'
        for subject in ("$SRV.PING.first-router.x.y", "$SRV.ANYTHING", "$SRV.PING.first-router.x.status"):
            await nc.publish(subject, b"")
            await nc.flush()
            wanted = f'permissions violation for publish to "{subject.lower()}"'
            await eventually(lambda w=wanted: any(w in e for e in errors), timeout=3, what=wanted)
        assert not any('"$srv.ping"' in e for e in errors)
    finally:
        await nc.close()
