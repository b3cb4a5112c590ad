"""The live status page: ``GET /status`` (static HTML, vanilla JS, inline SVG charts: nothing is
fetched from elsewhere) and the JSON it polls, ``GET /status.json``.

``/status`` itself is public. ``/status.json`` is behind the gateway's auth like the API (401 to an
anonymous caller where auth is on); the page then shows what FIRST's public
``/resource_server/status`` shows (clusters open to anyone, in service or not) with a note, and
asks for an API key to show the rest. A signed-in caller sees the models and clusters it may use.

The gateway keeps the charts' history itself (``StatusBoard``): every ``gateway.status_sample_s``
it asks the routers for their status (``StatusRequest``, as ``first status`` does) and reads the
tokens the workers reported on the usage subject since the last sample, into a ring covering
``gateway.status_history_s``, so a freshly opened page shows the recent past. Node events come
live from the events' subjects (shared/events.py) and, for the span before this gateway started,
from the events stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
from collections import deque
from pathlib import Path

import msgspec
import nats.errors
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.gateway import keys
from services.gateway.middleware import json_response
from services.gateway.status_history import MAX_EVENTS, EventLog, History, Sample, TokenMeter
from shared import access, clusterstate, errors, events, schema, streams
from shared.client import FirstClient
from shared.config import Config
from shared.subjects import Subjects
from shared.supervise import Throttle, every

PAGE = Path(__file__).parent / "static" / "status.html"
# A poll within this of the last look at the routers is answered from it: many open pages cost
# the routers one status request a second at most.
FRESH_S = 1.0
_STATUS_TIMEOUT_S = 2.0
EVENT_KINDS = ("node",)
_log = structlog.get_logger()


class StatusBoard:
    """The routers' latest status, the charts' history and the newest node events."""

    def __init__(self, nc: NATS, client: FirstClient, config: Config):
        self.nc, self.client, self.config = nc, client, config
        self.subjects = Subjects(config.nats.subject_prefix)
        gw = config.gateway
        self.history = History(gw.status_history_s, gw.status_sample_s)
        self.tokens = TokenMeter()
        self.events = EventLog()
        self._latest: list[schema.ModelStatus] = []
        self._router_id = ""
        self._error: str | None = "no answer from a router yet"
        self._looked = float("-inf")  # monotonic time of the last look
        self._look_lock = asyncio.Lock()
        self._bad_input = Throttle()
        self._subs: list = []
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        s = self.subjects
        self._subs.append(await self.nc.subscribe(s.usage, cb=self._on_usage))
        for kind in EVENT_KINDS:
            self._subs.append(await self.nc.subscribe(s.events_of(kind), cb=self._on_event))
        sample_s = self.config.gateway.status_sample_s
        self._tasks = [
            asyncio.create_task(self._recall_events()),
            asyncio.create_task(every(sample_s, self.sample, name="status_sampler")),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    # --- what comes in -------------------------------------------------------------------------

    async def _on_usage(self, msg: Msg) -> None:
        try:
            record = schema.usage_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            if self._bad_input("usage"):
                _log.warning("status_bad_usage_record", error=str(exc))
            return
        self.tokens.add(record)

    async def _on_event(self, msg: Msg) -> None:
        if (event := self._decode_event(msg.data)) is not None:
            self.events.add(_event_row(event))

    def _decode_event(self, data: bytes) -> schema.Event | None:
        try:
            return events.decode(data)
        except msgspec.DecodeError as exc:
            if self._bad_input("event"):
                _log.warning("status_bad_event", error=str(exc))
            return None

    async def _recall_events(self) -> None:
        """The node events of the charts' span, from the events stream, so a gateway that has
        just started lists them too; without the stream (JetStream off) only new ones are shown."""
        since = time.time() - self.config.gateway.status_history_s
        found: deque[dict] = deque(maxlen=MAX_EVENTS)  # the newest are kept
        try:
            for kind in EVENT_KINDS:
                async for stored in streams.read(
                    self.nc, events.stream_name(self.config), since, what="events",
                    creator=events.CREATOR, subject=self.subjects.events_of(kind),
                ):  # fmt: skip
                    if (event := self._decode_event(stored.data)) is not None:
                        found.append(_event_row(event))
        except streams.StreamNotFound:
            return  # no router has made it yet: nothing to recall
        except (streams.StreamError, nats.errors.Error, TimeoutError) as exc:
            _log.warning("status_events_not_recalled", error=str(exc) or type(exc).__name__)
        except Exception:
            _log.exception("status_events_not_recalled")
        self.events.merge(list(found))

    async def look(self, max_age_s: float = FRESH_S) -> None:
        """Ask the routers for their status unless the last answer is fresher than ``max_age_s``;
        concurrent callers share one request."""
        async with self._look_lock:
            if time.monotonic() - self._looked < max_age_s:
                return
            try:
                reply = await self.client.status(timeout_s=_STATUS_TIMEOUT_S)
            except errors.FirstError as exc:
                self._error = exc.message
                self._latest = []
            except msgspec.DecodeError as exc:
                self._error = f"a router sent an undecodable status: {exc}"
                self._latest = []
            else:
                self._error, self._latest, self._router_id = None, reply.models, reply.router_id
            self._looked = time.monotonic()

    async def sample(self) -> None:
        """One point of every chart: the queues now, the tokens/s since the previous point."""
        await self.look(max_age_s=0.0)
        self.history.add(Sample(time.time(), {m.id: m.queued for m in self._latest}, self.tokens.rates()))

    # --- what goes out -------------------------------------------------------------------------

    def view(self, identity: schema.Identity, maintenance: clusterstate.MaintenanceFollower | None) -> dict:
        """What this caller may see: the models and clusters it may use, their charts and events."""
        config = self.config
        visible = {m.id for m in config.models if access.may_use(identity, m, config)}
        models = [_model_row(m) for m in self._latest if m.id in visible]
        clusters, shown = [], set()
        for cluster in config.clusters:
            if not access.cluster_admits(identity, cluster, config):
                continue
            shown.add(cluster.name)
            message = maintenance.message(cluster.name) if maintenance is not None else None
            workers = [w for m in self._latest for w in m.workers if w.cluster == cluster.name]
            clusters.append(
                {
                    "name": cluster.name,
                    "status": "online" if message is None else "maintenance",
                    "message": message or "",
                    "workers": len(workers),
                    "slots_in_use": sum(w.in_flight for w in workers),
                    "slots": sum(w.capacity for w in workers),
                    "max_nodes": cluster.max_nodes,
                }
            )
        return {
            "at": time.time(),
            "router_id": self._router_id,
            "error": self._error,
            "sample_s": self.history.sample_s,
            "models": models,
            "clusters": clusters,
            "history": self.history.series(sorted(visible)),
            "events": [
                e
                for e in self.events.newest()
                if (not e["model"] or e["model"] in visible) and (not e["cluster"] or e["cluster"] in shown)
            ],
        }


def _event_row(e: schema.Event) -> dict:
    return {"time": e.time, "kind": e.kind, "name": e.name, "source": e.source, "cluster": e.cluster,
            "model": e.model, "node_id": e.node_id, "worker_id": e.worker_id, "reason": e.reason}  # fmt: skip


def _model_row(m: schema.ModelStatus) -> dict:
    return {
        "id": m.id,
        "status": m.state,
        "clusters": m.clusters,
        "workers": len(m.workers),
        "slots_in_use": sum(w.in_flight for w in m.workers),
        "slots": sum(w.capacity for w in m.workers),
        "queued": m.queued,
        "nodes_starting": m.nodes_starting,
    }


BOARD = web.AppKey("status_board", StatusBoard)
PAGE_HTML = web.AppKey("status_page_html", bytes)
PAGE_CSP = web.AppKey("status_page_csp", str)


def content_security_policy(html: bytes) -> str:
    """Only the page's own inline script and style run (by their digests, so nothing injected
    would), it talks to this gateway only, and no other site may frame it."""
    text = html.decode()
    digests = {}
    for tag in ("script", "style"):
        body = text.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        digests[tag] = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    return (
        f"default-src 'none'; script-src 'sha256-{digests['script']}'; "
        f"style-src 'sha256-{digests['style']}'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


async def page(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[PAGE_HTML],
        content_type="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": request.app[PAGE_CSP],
            "X-Content-Type-Options": "nosniff",
        },
    )


async def data(request: web.Request) -> web.Response:
    board = request.app[BOARD]
    await board.look()
    view = board.view(request[keys.IDENTITY], request.app.get(keys.MAINTENANCE))
    return json_response(view, headers={"Cache-Control": "no-store"})


async def _status_ctx(app: web.Application):
    app[PAGE_HTML] = await asyncio.to_thread(PAGE.read_bytes)
    app[PAGE_CSP] = content_security_policy(app[PAGE_HTML])
    board = StatusBoard(app[keys.NC], app[keys.CLIENT], app[keys.CONFIG])
    app[BOARD] = board
    await board.start()
    yield
    await board.stop()


def add_routes(app: web.Application) -> None:
    """``/status`` and ``/status.json``; the board starts after the NATS connection it reads."""
    app.router.add_get("/status", page)
    app.router.add_get("/status.json", data)
    app.cleanup_ctx.append(_status_ctx)
