"""The exporter: one Prometheus scrape that shows the whole federation (``first exporter``).

It listens on NATS as the read-only ``ops`` user (shared/natsauth.py): workers' heartbeats,
routers' Demand and beats, and the operator events (``<p>.v1.events.>``); and it serves
``GET /metrics`` (and ``/health``) over HTTP. At start it reads the node events kept in the event
stream, to know the nodes already up. It holds no request and sends nothing to the services, so any
number of exporters may run, and one that stops loses nothing but its own counters.
"""

from __future__ import annotations

import contextlib

import msgspec
import nats.errors
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.exporter.federation import Federation, FederationCollector
from shared import events, schema, streams
from shared.config import Config
from shared.connect import unsubscribe
from shared.nats_metrics import nats_reconnects
from shared.subjects import Subjects
from shared.supervise import Throttle, guarded


class Exporter:
    """``async with Exporter(nc, subjects, config, host, port)``: subscribed and serving."""

    def __init__(self, nc: NATS, subjects: Subjects, config: Config, host: str, port: int):
        self.nc, self.subjects, self.config, self.host, self.port = nc, subjects, config, host, port
        self.federation = Federation(config)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FederationCollector(self.federation))
        nats_reconnects(self.registry, "first_exporter_nats_reconnects", lambda: self.nc)
        self._subs: list = []
        self._runner: web.AppRunner | None = None
        self._noise = Throttle()
        self._log = structlog.get_logger()

    @property
    def url(self) -> str:
        """Where it serves, once started (the port it got where it was given 0)."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            return
        s = self.subjects
        for subject, cb in (
            (s.heartbeat_all, self._on_heartbeat),
            (s.demand, self._on_demand),
            (s.router_heartbeat_all, self._on_router_beat),
            (s.events_all, self._on_event),
        ):
            self._subs.append(await self.nc.subscribe(subject, cb=cb))
        await self._replay_nodes()
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except OSError:
            await runner.cleanup()
            await unsubscribe(self._subs)
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        self._log.info("exporter_listening", url=self.url + "/metrics")

    async def _replay_nodes(self) -> None:
        """The nodes already up: their events in the event stream, read after the live
        subscription began (the live ones win). Without the stream, nodes show from their next event."""
        f = self.federation
        f.replaying = True
        read = 0
        try:
            async for stored in streams.read(
                self.nc, events.stream_name(self.config), 0.0, what="events", creator=events.CREATOR,
                subject=self.subjects.events_of("node"),
            ):  # fmt: skip
                read += 1
                with contextlib.suppress(msgspec.DecodeError):
                    f.replay(events.decode(stored.data))
        except (streams.StreamError, nats.errors.Error) as exc:
            self._log.warning("exporter_no_node_history", error=str(exc) or repr(exc))
        finally:
            f.replayed()
        self._log.info("exporter_node_history", events=read, nodes=len(f.nodes))

    async def stop(self) -> None:
        await unsubscribe(self._subs)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Exporter:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # --- HTTP ----------------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _health(self, request: web.Request) -> web.Response:
        ok = self.nc.is_connected
        return web.json_response(
            {"status": "ok" if ok else "degraded", "nats": ok}, status=200 if ok else 503
        )

    # --- NATS (untrusted input: a message that does not decode is dropped, and logged once a minute)

    def _bad(self, what: str, msg) -> None:
        if self._noise(what):
            self._log.warning("undecodable_message", what=what, subject=msg.subject, note="once a minute")

    @guarded
    async def _on_heartbeat(self, msg) -> None:
        try:
            self.federation.heartbeat(schema.heartbeat_decoder.decode(msg.data))
        except msgspec.DecodeError:
            self._bad("heartbeat", msg)

    @guarded
    async def _on_demand(self, msg) -> None:
        try:
            self.federation.demand(schema.demand_decoder.decode(msg.data))
        except msgspec.DecodeError:
            self._bad("demand", msg)

    @guarded
    async def _on_router_beat(self, msg) -> None:
        try:
            self.federation.router_beat(schema.router_beat_decoder.decode(msg.data))
        except msgspec.DecodeError:
            self._bad("router_heartbeat", msg)

    @guarded
    async def _on_event(self, msg) -> None:
        try:
            self.federation.event(events.decode(msg.data))
        except msgspec.DecodeError:
            self._bad("event", msg)
