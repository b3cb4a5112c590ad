"""The status page's data, /status.json, from a real gateway, router and sim worker on the
session's nats-server (the page itself, in Chromium: tests/e2e/test_status_page.py): node events
from before the gateway started (the events stream) and after (live), garbage on the subjects it
reads, and what each caller may see (identities from a table: conftest TableAuth)."""

from __future__ import annotations

import aiohttp

from services.gateway.app import create_app
from shared import events, schema
from shared.events import EventPublisher
from tests.integration.conftest import make_config, table_auth
from tests.support import eventually

PEOPLE = {
    "ann": schema.Identity(user="ann", kind="key"),
    "sam": schema.Identity(user="sam", kind="key", groups=["staff"]),
}


async def get(url: str, who: str = "") -> tuple[int, dict | str]:
    headers = {"Authorization": f"Bearer {who}"} if who else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


def names(view: dict) -> list[str]:
    return [f"{e['name']} {e['node_id']}" for e in view["events"]]


async def test_node_events_from_before_the_gateway_and_after_it_started(services, subjects, nats_url):
    config = make_config(
        [{"id": "m"}], nats={"subject_prefix": subjects.prefix}, gateway={"status_sample_s": 0.2}
    )
    nc = await services.connect()
    await events.ensure(nc, config)
    scaler = EventPublisher(nc, subjects, "scaler")
    await scaler.emit("node", "requested", cluster="a", model="m", node_id="a-n0")
    js = nc.jetstream()

    async def stored() -> bool:
        return (await js.stream_info(events.stream_name(config))).state.messages == 1

    await eventually(stored, what="the event in the stream")
    await services.router(config)
    await services.worker(config, "m", cluster="a", worker_id="a-w1")
    url = await services.gateway(create_app(config, services.nats_url))

    async def shown(wanted: list[str]):
        status, view = await get(url + "/status.json")
        assert status == 200, view
        return view if names(view) == wanted else None

    await eventually(lambda: shown(["requested a-n0"]), what="the event from before the gateway started")

    # Garbage where the board listens is dropped; what follows it is still read.
    await nc.publish(subjects.event("node", "running", "scaler"), b"{not json")
    await nc.publish(subjects.event("node", "running", "scaler"), b'{"kind": "node"}')
    await nc.publish(subjects.usage, b"\xc1garbage")
    await scaler.emit("node", "running", cluster="a", model="m", node_id="a-n0")
    view = await eventually(lambda: shown(["running a-n0", "requested a-n0"]), what="the live event")
    assert view["events"][0] | {"time": 0} == {
        "time": 0, "kind": "node", "name": "running", "source": "scaler", "cluster": "a", "model": "m",
        "node_id": "a-n0", "worker_id": "", "reason": "",
    }  # fmt: skip

    # The routers' status (an open deployment: everything, to anyone) and the charts' history.
    async def live() -> dict | None:
        _, view = await get(url + "/status.json")
        ready = view["models"] and view["models"][0]["status"] == "live" and len(view["history"]["t"]) >= 2
        return view if ready else None

    view = await eventually(live, what="the worker, live, and two samples")
    assert view["models"] == [
        {"id": "m", "status": "live", "clusters": ["a", "b"], "workers": 1, "slots_in_use": 0, "slots": 4,
         "queued": 0, "nodes_starting": 1}  # node a-n0: running, but no worker of it yet
    ]  # fmt: skip
    assert [c["name"] for c in view["clusters"]] == ["a", "b"]
    assert view["clusters"][0] | {"max_nodes": 0} == {
        "name": "a", "status": "online", "message": "", "workers": 1, "slots_in_use": 0, "slots": 4,
        "max_nodes": 0,
    }  # fmt: skip
    series = view["history"]["models"]["m"]
    assert len(series["queued"]) == len(series["tokens_per_s"]) == len(view["history"]["t"])


async def test_each_caller_sees_what_it_may_use_and_no_key_gets_401(services, subjects):
    config = make_config(
        [{"id": "open"}, {"id": "staff-only", "clusters": ["vault"], "allowed_groups": ["staff"]}],
        nats={"subject_prefix": subjects.prefix},
        auth={"methods": ["keys"]},
        clusters=[{"name": "a"}, {"name": "vault", "allowed_groups": ["staff"]}],
    )
    await services.router(config)
    nc = await services.connect()
    scaler = EventPublisher(nc, subjects, "scaler")
    app = create_app(config, services.nats_url)
    table_auth(app, PEOPLE)
    url = await services.gateway(app)

    status, page = await get(url + "/status")  # the page itself is public
    assert status == 200 and "<title>FIRST status</title>" in page
    status, body = await get(url + "/status.json")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = await get(url + "/status.json", "nobody")
    assert status == 401

    await scaler.emit("node", "requested", cluster="vault", model="staff-only", node_id="vault-n0")
    await scaler.emit("node", "failed", cluster="vault", node_id="vault-n1")  # no model: the cluster's
    await scaler.emit("node", "requested", cluster="a", model="open", node_id="a-n0")

    seen: dict[str, list[str]] = {}

    async def both_events(who: str):
        status, view = await get(url + "/status.json", who)
        assert status == 200, view
        seen[who] = names(view)
        return view if len(view["events"]) == (3 if who == "sam" else 1) else None

    try:
        ann = await eventually(lambda: both_events("ann"), what="ann's event")
        sam = await eventually(lambda: both_events("sam"), what="sam's events")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the page listed {seen}") from None
    assert [m["id"] for m in ann["models"]] == ["open"] and list(ann["history"]["models"]) == ["open"]
    assert [c["name"] for c in ann["clusters"]] == ["a"]
    assert names(ann) == ["requested a-n0"]
    assert [m["id"] for m in sam["models"]] == ["open", "staff-only"]
    assert [c["name"] for c in sam["clusters"]] == ["a", "vault"]
    assert names(sam) == ["requested a-n0", "failed vault-n1", "requested vault-n0"]


async def test_no_router_is_said_on_the_page_not_a_500(services, subjects, nats_url):
    """The page shows the routers' silence as a problem line; the data still answers 200."""
    config = make_config([{"id": "m"}], nats={"subject_prefix": subjects.prefix})
    url = await services.gateway(create_app(config, nats_url))
    status, view = await get(url + "/status.json")
    assert status == 200
    assert view["error"] == "no router is running" and view["models"] == []
