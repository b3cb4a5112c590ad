"""NATS permissions, proven by a real nats-server with the config ``first up`` writes
(shared/natsauth.py): each role may do its part and the server refuses everything else.

Every refusal is checked twice: the server says so (a permissions-violation error on the offending
connection), and nothing happens (no one receives the message, no stream appears).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import msgspec
import nats
import nats.errors
import orjson
import pytest

from services.router.service import Router
from services.worker.engines import make_engine
from services.worker.service import Worker
from shared import clusterstate, errors, natsauth, schema
from shared import config as cfg
from shared.client import FirstClient
from shared.connect import close, connect, credential_options
from shared.natsserver import EmbeddedNats
from shared.subjects import Subjects
from tests.support import eventually

PREFIX = "sec"
S = Subjects(PREFIX)
MESSAGES = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})


def _config() -> cfg.Config:
    slow = {"kind": "sim", "ttft_ms": 1, "itl_ms": 200, "default_max_tokens": 50}
    config = msgspec.convert(
        {
            "nats": {"subject_prefix": PREFIX, "clients": [{"name": "alice"}, {"name": "bob"},
                                                           {"name": "carol", "groups": ["staff"]}]},
            "clusters": [{"name": "a", "max_nodes": 2}],
            "models": [
                {"id": "m", "engine": {"kind": "sim", "ttft_ms": 1, "itl_ms": 1}},
                {"id": "slow", "engine": slow},
                {"id": "staff-only", "allowed_groups": ["staff"], "engine": {"kind": "sim"}},
                {"id": "cold", "scaling": {"min_hot": 0}, "engine": {"kind": "sim"}},
            ],
            "worker": {"heartbeat_s": 0.2},
        },
        cfg.Config,
    )  # fmt: skip
    cfg.validate(config)
    return config


class Probe:
    """A connection as one role, which keeps the errors the server sends it."""

    def __init__(self, nc, errs: list[str]):
        self.nc, self.errors = nc, errs

    async def refused(self, what: str, subject: str) -> None:
        """The server reported a violation for ``what`` ("publish" or "subscription") to ``subject``."""
        await self.nc.flush()
        wanted = f'permissions violation for {what} to "{subject}"'.lower()  # as nats-py reports it
        await eventually(lambda: any(wanted in e.lower() for e in self.errors), timeout=3, what=wanted)


class Secured:
    def __init__(self, url: str, credentials: natsauth.Credentials, config: cfg.Config, stack):
        self.url, self.credentials, self.config, self.stack = url, credentials, config, stack
        self.routers: list[Router] = []

    def seed(self, role: str) -> str:
        return str(self.credentials.seed_file(role))

    async def probe(self, role: str) -> Probe:
        errs: list[str] = []

        async def on_error(exc: Exception) -> None:
            errs.append(str(exc))

        nc = await nats.connect(
            self.url, error_cb=on_error, allow_reconnect=False, **credential_options(self.seed(role))
        )
        self.stack.push_async_callback(close, nc)
        return Probe(nc, errs)

    async def connect(self, role: str):
        nc = await connect(self.url, f"test-{role}", self.seed(role))
        self.stack.push_async_callback(close, nc)
        return nc

    async def router(self) -> Router:
        router = Router(await self.connect("router"), S, self.config)
        self.routers.append(await self.stack.enter_async_context(router))
        return router

    async def worker(self, slot: str, model: str = "m") -> Worker:
        model_cfg = self.config.model(model)
        nc = await self.connect(slot)
        worker = Worker(nc, S, self.config.worker, model_cfg, "a", make_engine(model_cfg), worker_id=slot)
        return await self.stack.enter_async_context(worker)

    async def client(self, user: str) -> FirstClient:
        client = FirstClient(await self.connect(user), S, user=user, request_timeout_s=5)
        return await self.stack.enter_async_context(client)


@pytest.fixture(scope="module")
async def server(tmp_path_factory):
    config = _config()
    directory = tmp_path_factory.mktemp("nats-auth")
    credentials = natsauth.write_credentials(directory / "credentials", natsauth.roles(config))
    conf = directory / "server.conf"
    conf.write_bytes(natsauth.server_config(credentials, host="127.0.0.1", port=-1, store_dir=str(directory)))
    async with EmbeddedNats(config_file=str(conf), users=credentials.public_keys()) as srv:
        yield srv.url, credentials, config


@pytest.fixture
async def secured(server):
    url, credentials, config = server
    async with contextlib.AsyncExitStack() as stack:
        yield Secured(url, credentials, config, stack)


@pytest.fixture
async def stack(secured):
    """A router and a worker for ``m`` in slot a-n0, each on its own credentials."""
    await secured.router()
    await secured.worker("a-n0")
    return secured


async def test_no_connection_without_credentials(server):
    url, *_ = server
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


async def test_a_native_client_is_served_as_itself_whatever_its_request_claims(stack):
    """The identity comes from the subject its credentials allow, not from the message."""
    admin = await stack.connect("admin")
    usage = await admin.subscribe(S.usage)
    alice = await stack.client("alice")
    forged = schema.Identity(user="root", kind="globus", groups=["staff"])
    request = schema.InferRequest(
        request_id=uuid.uuid4().hex, model="m", endpoint="chat", body=MESSAGES,
        reply_to=S.reply_stream("alice", "r1"), created=0.0, identity=forged,
    )  # fmt: skip
    # What FirstClient sends, with a forged identity: the router replaces it.
    answer = await alice.complete("m", "chat", MESSAGES)
    assert answer.usage.completion_tokens == 3
    record = schema.usage_decoder.decode((await usage.next_msg(timeout=5)).data)
    assert (record.identity.user, record.identity.kind) == ("alice", "nats")
    await alice.nc.publish(S.infer_user("alice"), schema.encode(request), reply=request.reply_to)
    record = schema.usage_decoder.decode((await usage.next_msg(timeout=5)).data)
    assert record.identity == schema.Identity(user="alice", kind="nats", name="alice")


async def test_a_model_closed_to_the_callers_groups_is_refused_with_403(stack):
    await stack.worker("a-n1", "staff-only")
    alice, carol = await stack.client("alice"), await stack.client("carol")
    with pytest.raises(errors.Forbidden, match="staff-only"):
        await alice.complete("staff-only", "chat", MESSAGES)
    assert (await carol.complete("staff-only", "chat", MESSAGES)).usage.completion_tokens > 0


async def test_a_client_cannot_pose_as_another_or_as_the_gateway(stack):
    alice = await stack.probe("alice")
    for subject in (S.infer, S.infer_user("bob")):
        await alice.nc.publish(subject, b"{}")
        await alice.refused("publish", subject)


async def test_a_reply_stream_named_for_another_user_gets_nothing(stack):
    """A request whose reply_to is bob's: bob hears nothing, alice gets no answer."""
    bob_probe = await stack.probe("bob")
    bob_stream = await bob_probe.nc.subscribe(S.reply_stream_all("bob"))
    alice = await stack.connect("alice")
    request = schema.InferRequest(
        request_id="hijack", model="m", endpoint="chat", body=MESSAGES,
        reply_to=S.reply_stream("bob", "hijack"), created=0.0,
    )  # fmt: skip
    await alice.publish(S.infer_user("alice"), schema.encode(request))
    with pytest.raises(nats.errors.TimeoutError):
        await bob_stream.next_msg(timeout=1)


async def test_no_one_outside_the_path_publishes_into_a_reply_stream(stack):
    for role in ("alice", "ops", "scaler", "gateway"):
        probe = await stack.probe(role)
        if role == "gateway":
            continue  # the gateway reads reply streams; it has no reason to write them
        subject = S.reply_stream("bob", "r1")
        await probe.nc.publish(subject, b"{}")
        await probe.refused("publish", subject)


async def test_a_client_reads_only_its_own_answers(stack):
    alice = await stack.probe("alice")
    for subject in (S.reply_stream_all("bob"), S.reply_all, "_INBOX.>", S.infer, S.infer_users, S.usage):
        await alice.nc.subscribe(subject)
        await alice.refused("subscription", subject)


async def test_a_client_cannot_publish_heartbeats_demand_or_node_events(stack):
    heard: list = []
    admin = await stack.connect("admin")

    async def hear(msg) -> None:
        heard.append(msg)

    await admin.subscribe(f"{PREFIX}.v1.>", cb=hear)
    await admin.flush()
    alice = await stack.probe("alice")
    for subject in (S.heartbeat("a", "a-n0"), S.demand, S.event("node", "running", "scaler"), S.usage,
                    S.router_heartbeat("r"), S.worker_infer("a-n0"), S.router_ack("r", 1),
                    S.event("worker", "ready", "a-n0"), S.event("limit", "hit", "gateway-x")):  # fmt: skip
        await alice.nc.publish(subject, b"{}")
        await alice.refused("publish", subject)
    beat = S.heartbeat("a", "a-n0")
    await eventually(lambda: any(m.subject == beat for m in heard), what="the worker's own heartbeat")
    assert not [m.subject for m in heard if m.data == b"{}"]  # the stack's traffic, none of hers


async def test_a_status_request_cannot_aim_the_routers_answer_at_the_stacks_subjects(stack):
    """A router answers ``status`` by its own right (allow_responses) to whatever reply subject the
    request names: it must answer only an inbox, or alice could make it write into bob's reply
    stream, the usage stream (kept on disk), a heartbeat or the demand."""
    admin = await stack.connect("admin")
    targets = [S.reply_stream("bob", "r1"), S.usage, S.heartbeat("a", "a-n0"), S.demand]
    written: list = []

    async def hear(msg) -> None:
        if b"status_reply" in msg.data:  # the tag of a StatusReply, in msgpack
            written.append(msg.subject)

    for target in targets:
        await admin.subscribe(target, cb=hear)
    await admin.flush()
    alice = await stack.probe("alice")
    for target in targets:
        await alice.nc.publish(S.status, schema.encode(schema.StatusRequest()), reply=target)
    answer = await alice.nc.request(S.status, schema.encode(schema.StatusRequest()), timeout=5)
    assert msgspec.msgpack.decode(answer.data, type=schema.StatusReply).router_id  # her inbox is answered
    await admin.flush()
    assert written == []


async def test_a_worker_takes_only_its_own_dispatches(stack):
    worker = await stack.probe("a-n1")
    for subject in (S.worker_infer("a-n0"), S.worker_infer_all, S.infer, S.infer_users, S.reply_all,
                    S.cancel, S.heartbeat_all, S.usage):  # fmt: skip
        await worker.nc.subscribe(subject)
        await worker.refused("subscription", subject)
    for subject in (S.heartbeat("a", "a-n0"), S.worker_runs("a-n0"), S.demand, S.infer,
                    S.event("node", "running", "scaler"), S.event("worker", "ready", "a-n0")):  # fmt: skip
        await worker.nc.publish(subject, b"{}")
        await worker.refused("publish", subject)


async def test_only_the_scaler_tells_workers_to_drain_and_keeps_its_node_table(stack):
    """A worker's control subject: the scaler publishes, that worker alone reads; the scaler's
    bucket: the scaler writes, ops reads, a worker does neither."""
    for role in ("alice", "a-n1", "gateway", "router", "ops"):
        probe = await stack.probe(role)
        await probe.nc.publish(S.worker_control("a-n0"), b"{}")
        await probe.refused("publish", S.worker_control("a-n0"))
    other = await stack.probe("a-n1")
    await other.nc.subscribe(S.worker_control("a-n0"))
    await other.refused("subscription", S.worker_control("a-n0"))

    own = await stack.connect("a-n0")
    got = await own.subscribe(S.worker_control("a-n0"))
    await own.flush()
    scaler = await stack.connect("scaler")
    await scaler.publish(S.worker_control("a-n0"), schema.encode(schema.WorkerControl(action="drain")))
    assert schema.worker_control_decoder.decode((await got.next_msg(timeout=3)).data).action == "drain"

    bucket = natsauth.scaler_bucket(stack.config)
    kv = await scaler.jetstream(timeout=3).create_key_value(bucket=bucket, history=1)
    await kv.put("node.x", b"entry")
    ops = await stack.connect("ops")
    assert (await (await ops.jetstream(timeout=3).key_value(bucket)).get("node.x")).value == b"entry"
    worker = await stack.probe("a-n1")
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await worker.nc.jetstream(timeout=1).publish(f"$KV.{bucket}.node.x", b"forged")
    await worker.refused("publish", f"$KV.{bucket}.node.x")


async def test_only_the_stack_touches_jetstream(stack):
    """The incident this prevents: a stream on the infer subject stored every prompt on disk and
    made requests fail."""
    for role in ("alice", "ops", "a-n0", "scaler"):
        probe = await stack.probe(role)
        js = probe.nc.jetstream(timeout=1)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await js.add_stream(name=f"EVIL_{role.replace('-', '_')}", subjects=[S.infer, S.infer_users])
        await probe.refused("publish", f"$JS.API.STREAM.CREATE.EVIL_{role.replace('-', '_')}")
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await js.add_consumer("KV_" + natsauth.keys_bucket(stack.config), durable_name="steal")
    admin = (await stack.connect("admin")).jetstream()
    assert not [s.config.name for s in await admin.streams_info() if s.config.name.startswith("EVIL")]


async def test_a_client_cancels_its_own_runs_and_no_one_elses(stack):
    await stack.worker("a-n1", "slow")
    usage = await (await stack.connect("admin")).subscribe(S.usage)
    alice, bob = await stack.client("alice"), await stack.client("bob")
    slow = orjson.dumps({"model": "slow", "prompt": "x", "max_tokens": 6, "stream": True})

    async def bobs_run() -> list:
        async with bob.open("slow", "completion", slow, request_id="bobs-run") as answer:
            return [c async for c in answer]

    bobs = asyncio.create_task(bobs_run())
    async with alice.open("slow", "completion", slow, request_id="alices-run") as answer:
        await anext(aiter(answer))  # both run on the worker now
        cancel = schema.encode(schema.Cancel("bobs-run", "mischief"))
        await alice.nc.publish(S.cancel_user("alice"), cancel)
        await alice.nc.publish(S.worker_cancel_user("a-n1", "alice"), cancel)
    # Leaving the block cancelled alice's own run.
    chunks = await asyncio.wait_for(bobs, timeout=10)
    assert chunks[-1].done and chunks[-1].usage.completion_tokens == 6
    outcomes = {}
    while len(outcomes) < 2:
        record = schema.usage_decoder.decode((await usage.next_msg(timeout=5)).data)
        outcomes[record.request_id] = record.outcome
    assert outcomes == {"alices-run": "cancelled", "bobs-run": "ok"}


async def test_a_held_request_is_cancelled_only_by_its_owner(stack):
    """A request a router holds (its model has no worker yet) outlives another user's cancel."""
    alice, bob = await stack.client("alice"), await stack.client("bob")
    body = orjson.dumps({"model": "cold", "prompt": "x", "max_tokens": 2})

    async def bobs_run():
        async with bob.open("cold", "completion", body, request_id="bobs-held") as answer:
            return [c async for c in answer]

    bobs = asyncio.create_task(bobs_run())
    await eventually(lambda: len(stack.routers[0].queues["cold"]) == 1, what="the router to hold it")
    await alice.nc.publish(S.cancel_user("alice"), schema.encode(schema.Cancel("bobs-held", "mischief")))
    await alice.nc.flush()
    await asyncio.sleep(0.2)
    assert len(stack.routers[0].queues["cold"]) == 1
    await stack.worker("a-n1", "cold")
    chunks = await asyncio.wait_for(bobs, timeout=10)
    assert chunks[-1].usage.completion_tokens == 2


async def test_gateways_and_routers_read_the_maintenance_bucket_only_admin_writes(secured):
    bucket = clusterstate.bucket_name(secured.config)
    admin = (await secured.connect("admin")).jetstream(timeout=2)
    kv = await clusterstate.open_bucket(admin, bucket, create=True)
    await clusterstate.set_maintenance(kv, "a", "down for a day")
    try:
        for role in ("gateway", "router"):
            follower = clusterstate.MaintenanceFollower(await secured.connect(role), secured.config)
            await follower.reload()
            assert follower.clusters == {"a": "down for a day"}, role
        for role in ("router", "alice"):
            probe = await secured.probe(role)
            with contextlib.suppress(nats.errors.Error):
                await probe.nc.request(f"$KV.{bucket}.a", b"{}", timeout=0.5)
            await probe.refused("publish", f"$KV.{bucket}.a")
        follower = clusterstate.MaintenanceFollower(await secured.connect("alice"), secured.config)
        with pytest.raises(nats.errors.Error):  # a NATS-native client does not read it
            await follower.reload()
    finally:
        await clusterstate.clear_maintenance(kv, "a")
