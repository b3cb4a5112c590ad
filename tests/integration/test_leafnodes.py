"""Federation over NATS leaf nodes, with real nats-server processes in the production shape
(docs/federation.md): a hub with JetStream, where the router and the callers connect, and one leaf
node per HPC site, where that site's workers connect. The servers run the configs that ``first
nats-auth --leaf-port`` writes: each worker connects to its site's leaf with its slot's seed, and
each leaf connects to the hub as ``leaf-<site>``, which may carry only that site's worker subjects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import nats
import nats.errors
import nats.js.errors
import openai
import orjson
import pytest

from services.admin import leafnodes, nats_auth
from services.cli import _parser
from services.gateway.app import create_app, start_site
from services.router.service import Router
from services.worker.engines import make_engine
from services.worker.engines.openai_server import free_port
from services.worker.service import Worker
from shared import config as cfg
from shared import keystore, natsauth, schema, usage_stream
from shared.client import FirstClient
from shared.connect import close, connect, credential_options
from shared.natsserver import EmbeddedNats
from shared.subjects import Subjects
from tests.support import eventually

PREFIX = "fed"
S = Subjects(PREFIX)
SITES = ("polaris", "sophia")
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})


def _config() -> cfg.Config:
    config = msgspec.convert(
        {
            "nats": {"subject_prefix": PREFIX, "clients": [{"name": "alice"}]},
            "clusters": [{"name": site, "max_nodes": 1} for site in SITES],
            # capacity 1 and ~100 ms per answer: two requests at once need a worker on each leaf
            "models": [{"id": "m", "capacity": 1, "engine": {"kind": "sim", "ttft_ms": 1, "itl_ms": 12}}],
            "worker": {"heartbeat_s": 0.2},
            "router": {"missed_heartbeats": 3, "dispatch_timeout_s": 2.0},
        },
        cfg.Config,
    )
    cfg.validate(config)
    return config


class Server(EmbeddedNats):
    """A nats-server the test can kill outright, as a crashed or unplugged host."""

    def __init__(self, *, config_file: str, users: dict[str, str] | None = None):
        super().__init__(config_file=config_file, users=users)
        self.config_file = config_file

    async def kill(self) -> None:
        proc = self._proc
        proc.kill()
        await proc.wait()


class Federation:
    def __init__(self, config, hub: list[Server], leaves: dict[str, Server], creds, stack):
        self.config, self.hub, self.leaves, self.creds, self.stack = config, hub, leaves, creds, stack

    async def connect(self, url: str, role: str):
        nc = await connect(url, f"test-{role}", str(self.creds.seed_file(role)))
        self.stack.push_async_callback(close, nc)
        return nc

    async def worker(self, site: str) -> Worker:
        """The site's first node slot, connected to the site's leaf with that slot's seed."""
        slot = natsauth.worker_slot(site, 0)
        model = self.config.model("m")
        nc = await self.connect(self.leaves[site].url, slot)
        worker = Worker(nc, S, self.config.worker, model, site, make_engine(model), worker_id=slot)
        return await self.stack.enter_async_context(worker)

    async def ready_workers(self, client: FirstClient) -> set[str]:
        status = await client.status()
        return {w.worker_id for m in status.models for w in m.workers if w.state == "ready"}


def _hub_server(out, i: int, client_ports: list[int], route_ports: list[int], leaf_ports: list[int]) -> str:
    """One server of the 3-server hub, as in compose/leafnodes/hub-<i>.conf: what ``first
    nats-auth`` wrote (users, leaf listener, JetStream domain), plus a name, a store, a cluster."""
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    conf = out / f"hub-{i}.conf"
    conf.write_text(
        f"""include "nats-server.conf"
server_name: hub-{i}
port: {client_ports[i]}
jetstream {{ store_dir: "{out / f"hub-{i}"}", domain: hub }}
leafnodes {{ host: 127.0.0.1, port: {leaf_ports[i]} }}
cluster {{ name: first-hub, listen: "127.0.0.1:{route_ports[i]}", routes: [{routes}] }}
"""
    )
    return str(conf)


@pytest.fixture
async def federation(tmp_path, capsys):
    """The files ``first nats-auth --leaf-port`` writes, run: a 3-server hub (JetStream clustered)
    and a leaf node per cluster, whose link lists every hub server."""
    config = _config()
    out = tmp_path / "nats"
    client_ports, route_ports, leaf_ports = ([free_port() for _ in range(3)] for _ in range(3))
    hub_urls = [arg for p in leaf_ports for arg in ("--hub-url", f"nats-leaf://127.0.0.1:{p}")]
    argv = ["nats-auth", "--out", str(out), "--port", "-1",  # the config: built above
            "--leaf-port", str(leaf_ports[0]), *hub_urls, "--leaf-host", "127.0.0.1",
            "--leaf-client-port", "-1"]  # fmt: skip
    assert await nats_auth.main(config, _parser().parse_args(argv)) == 0
    capsys.readouterr()
    creds = natsauth.Credentials(out / "credentials", leafnodes.roles(config))
    users = creds.public_keys()
    async with contextlib.AsyncExitStack() as stack:
        hub = []
        for i in range(3):
            conf = _hub_server(out, i, client_ports, route_ports, leaf_ports)
            hub.append(await stack.enter_async_context(Server(config_file=conf, users=users)))
        leaves = {}
        for site in SITES:  # each on a port of its own, kept when it is restarted
            conf = out / f"leaf-{site}.local.conf"
            conf.write_text(f'include "leaf-{site}.conf"\nport: {free_port()}\n')
            leaves[site] = await stack.enter_async_context(Server(config_file=str(conf), users=users))
        yield Federation(config, hub, leaves, creds, stack)


async def test_a_caller_on_the_hub_reaches_a_worker_on_each_leaf_and_survives_losing_one(federation):
    """Requests on the hub are served by workers on both leaves; after one leaf server is killed
    (SIGKILL), the router forgets its worker within missed_heartbeats x heartbeat_s (0.6 s, 3 s
    allowed) and every request is served by the other leaf, none lost; restarted, the leaf and its
    worker are back in routing."""
    f = federation
    # Routers create the usage stream with one replica; `usage.replicas = 3` (the 3 hub servers)
    # raises it, and without the setting a router leaves the stream's replicas as it finds them.
    admin = await f.connect(f.hub[2].url, "admin")
    js = admin.jetstream(timeout=0.5)
    name = usage_stream.stream_name(f.config)
    await eventually(lambda: _jetstream_ready(js), timeout=10, what="JetStream on the hub cluster")
    router_nc = await f.connect(f.hub[0].url, "router")
    assert (await usage_stream.ensure(router_nc, f.config)).config.num_replicas == 1
    replicated = msgspec.structs.replace(f.config, usage=msgspec.structs.replace(f.config.usage, replicas=3))
    assert (await usage_stream.ensure(router_nc, replicated)).config.num_replicas == 3
    assert (await usage_stream.ensure(router_nc, f.config)).config.num_replicas == 3
    keys = await keystore.open_bucket(js, keystore.bucket_name(f.config), create=True, replicas=3)
    assert (
        await keys.status()
    ).stream_info.config.num_replicas == 3  # auth.keys.replicas, as first keys uses it
    await f.stack.enter_async_context(Router(router_nc, S, f.config))
    # The caller on another hub server than the router: requests cross the hub's routes too.
    alice = FirstClient(await f.connect(f.hub[1].url, "alice"), S, user="alice", request_timeout_s=10)
    await f.stack.enter_async_context(alice)
    for site in SITES:
        await f.worker(site)
    both = {natsauth.worker_slot(site, 0) for site in SITES}
    await eventually(lambda: _ready(f, alice, both), timeout=10, what="a ready worker on each leaf")

    # Capacity 1 each: two requests at once take a worker on each leaf; answers stream back.
    results = await asyncio.gather(*(alice.complete("m", "chat", BODY) for _ in range(2)))
    assert {r.worker_id for r in results} == both
    assert all(r.texts[0] and r.finish_reasons[0] == "length" for r in results)
    # Each worker's accept crosses back to the router at once: three more rounds take ~0.3 s, not
    # a dispatch timeout per request (what a link that drops the accepts costs).
    started = time.monotonic()
    for _ in range(3):
        rounds = await asyncio.gather(*(alice.complete("m", "chat", BODY) for _ in range(2)))
        assert {r.worker_id for r in rounds} == both
    assert time.monotonic() - started < f.config.router.dispatch_timeout_s

    # Usage records (one per run) from both leaves reach the stream on the hub's JetStream.
    await eventually(lambda: _stored(js, name, 8), timeout=5, what="eight usage records on the hub")

    # Lose the polaris site: its leaf server dies, and its worker with it (for the rest of the system).
    await f.leaves["polaris"].kill()
    lost_at = time.monotonic()
    answers = await asyncio.gather(*(alice.complete("m", "chat", BODY) for _ in range(4)))
    assert {r.worker_id for r in answers} == {"sophia-n0"}
    assert all(r.texts[0] for r in answers)
    await eventually(lambda: _ready(f, alice, {"sophia-n0"}), timeout=3, what="polaris-n0 forgotten")
    forgotten_s = time.monotonic() - lost_at
    bound = f.config.router.missed_heartbeats * f.config.worker.heartbeat_s
    assert forgotten_s < bound + 3, forgotten_s
    again = await alice.complete("m", "chat", BODY)
    assert again.worker_id == "sophia-n0"

    # The site comes back: its leaf node links up to the hub again, its worker reconnects to it by
    # itself (nats-py tries every 2 s), beats, and is routed to.
    restarted = Server(config_file=f.leaves["polaris"].config_file, users=f.creds.public_keys())
    f.leaves["polaris"] = await f.stack.enter_async_context(restarted)
    await eventually(lambda: _ready(f, alice, both), timeout=10, what="polaris-n0 back in routing")
    results = await asyncio.gather(*(alice.complete("m", "chat", BODY) for _ in range(2)))
    assert {r.worker_id for r in results} == both


async def test_a_gateway_on_the_hub_serves_the_openai_sdk_from_a_worker_on_each_leaf(federation):
    """The issue's shape over HTTP: the openai SDK calls a real gateway app connected to one hub
    server with the gateway's seed; a router on another hub server sends each request across a
    leaf link. FIRST's pinned base URL of each site is answered by that site's worker; two
    unpinned requests at once (capacity 1 each) take a worker on each leaf. The usage records on
    the hub say which worker ran each."""
    f = federation
    await f.stack.enter_async_context(Router(await f.connect(f.hub[0].url, "router"), S, f.config))
    app = create_app(f.config, f.hub[1].url, credentials=str(f.creds.seed_file("gateway")))
    runner = await start_site(app, "127.0.0.1", 0)
    f.stack.push_async_callback(runner.cleanup)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    usage = await (await f.connect(f.hub[2].url, "admin")).subscribe(S.usage)
    alice = FirstClient(await f.connect(f.hub[2].url, "alice"), S, user="alice", request_timeout_s=10)
    await f.stack.enter_async_context(alice)
    for site in SITES:
        await f.worker(site)
    both = {natsauth.worker_slot(site, 0) for site in SITES}
    await eventually(lambda: _ready(f, alice, both), timeout=10, what="a ready worker on each leaf")

    def sdk(path: str) -> openai.AsyncOpenAI:  # auth.methods "none": the gateway is on loopback
        client = openai.AsyncOpenAI(base_url=url + path, api_key="unused", max_retries=0, timeout=10)
        f.stack.push_async_callback(client.close)
        return client

    def chat(client: openai.AsyncOpenAI):
        return client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )

    pinned = await asyncio.gather(*(chat(sdk(f"/resource_server/{site}/sim/v1")) for site in SITES))
    federated = sdk("/v1")
    unpinned = await asyncio.gather(chat(federated), chat(federated))
    for reply in [*pinned, *unpinned]:
        assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
        assert reply.model == "m" and reply.usage.completion_tokens == 8
    records = [schema.usage_decoder.decode((await usage.next_msg(timeout=5)).data) for _ in range(4)]
    runs = sorted((r.cluster, r.worker_id) for r in records)
    assert runs == [("polaris", "polaris-n0")] * 2 + [("sophia", "sophia-n0")] * 2


async def _ready(f: Federation, client: FirstClient, wanted: set[str]) -> bool:
    return await f.ready_workers(client) == wanted


async def _jetstream_ready(js) -> bool:
    """Until the hub's JetStream cluster has elected its meta leader, the API is unavailable."""
    try:
        await js.account_info()
    except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError):
        return False
    return True


async def _stored(js, name: str, count: int) -> bool:
    return (await js.stream_info(name)).state.messages >= count


async def test_a_leaf_link_carries_only_its_sites_worker_subjects(federation, tmp_path):
    """The hub applies ``leaf-<site>`` to the link, so even a compromised site server (here: a
    polaris leaf with an extra local user allowed everything) gets only its own workers'
    dispatches and cancels, and can put only their beats, answers and usage into the hub. And a
    worker slot of one site cannot log in on another site's leaf."""
    f = federation
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            f.leaves["sophia"].url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2,
            **credential_options(str(f.creds.seed_file("polaris-n0"))),
        )  # fmt: skip

    conf = orjson.loads((tmp_path / "nats" / "leaf-polaris.conf").read_bytes())
    conf["authorization"]["users"].append({"user": "rogue", "password": "rogue"})
    (tmp_path / "rogue.conf").write_bytes(orjson.dumps(conf))
    rogue_leaf = await f.stack.enter_async_context(Server(config_file=str(tmp_path / "rogue.conf")))
    rogue = await nats.connect(rogue_leaf.url, user="rogue", password="rogue")
    f.stack.push_async_callback(rogue.close)
    admin = await f.connect(f.hub[0].url, "admin")

    # Hub -> leaf: the site's own dispatch subject crosses, nothing else does.
    got = await rogue.subscribe(">")
    own = S.worker_infer("polaris-n0")

    async def crossed() -> bool:
        await admin.publish(own, b"probe")
        with contextlib.suppress(nats.errors.TimeoutError):
            return (await got.next_msg(timeout=0.1)).subject == own
        return False

    await eventually(crossed, timeout=10, what="the leaf link to carry polaris-n0's dispatches")
    while got.pending_msgs:
        await got.next_msg()
    for subject in (
        S.infer,
        S.infer_user("alice"),
        S.worker_infer("sophia-n0"),
        S.reply_stream("alice", "r1"),
    ):
        await admin.publish(subject, b"secret")
    await admin.publish(own, b"last")
    assert (await got.next_msg(timeout=2)).data == b"last"  # what was sent before it was dropped

    # Leaf -> hub: the site's beats cross; another site's beats, demand, node events do not.
    seen = await admin.subscribe(f"{PREFIX}.>")
    await admin.flush()
    mine = S.heartbeat("polaris", "polaris-n0")

    async def arrived() -> bool:
        await rogue.publish(mine, b"probe")
        with contextlib.suppress(nats.errors.TimeoutError):
            return (await seen.next_msg(timeout=0.1)).subject == mine
        return False

    await eventually(arrived, timeout=10, what="the leaf link to carry polaris-n0's beats")
    await asyncio.sleep(0)  # let stray probes land before the ordered check
    for subject in (S.heartbeat("sophia", "sophia-n0"), S.demand, S.event("node", "running", "scaler"),
                    S.worker_infer("sophia-n0")):  # fmt: skip
        await rogue.publish(subject, b"forged")
    await rogue.publish(mine, b"last")
    while (msg := await seen.next_msg(timeout=2)).data != b"last":
        assert msg.subject == mine, f"{msg.subject} crossed from the leaf"
