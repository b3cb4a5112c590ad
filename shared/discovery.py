"""Each service's registration with NATS's service API (nats-py's ``nats.micro``), so that
``nats micro ls|info|stats`` and ``first services`` list a deployment's gateways, routers,
scalers and workers: name, version, instance id, metadata (the subject prefix, host, pid and the
service's own ids), one ``status`` endpoint and the service's own counters as the stats' data.

Nothing on a request's path goes through here: the only endpoint is ``status``, on a subject of
its own instance (``<prefix>.v1.service.<name>.<instance>.status``), and the counters are read
only when someone asks.

Answers go only to an inbox (``_INBOX.…``). The server lets a service answer whatever reply
subject a request it received names (allow_responses), so without this check an operator could
aim a service's answers at the deployment's own subjects (``first.v1.infer``, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from importlib import metadata as package_metadata

import msgspec
import nats.errors
import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service, ServiceConfig

from shared.lifecycle import Lifecycle
from shared.subjects import SERVICE_VERBS, Subjects, service_request
from shared.supervise import Throttle

INBOX = "_INBOX."
_PACKAGE = "first-nats"

Counters = Callable[[], dict]  # the service's own counters: JSON-able, read when someone asks


def version() -> str:
    """The package's version (semantic, as the service API wants it)."""
    try:
        return package_metadata.version(_PACKAGE)
    except package_metadata.PackageNotFoundError:
        return "0.0.0"


def answerable(reply: str) -> bool:
    """A reply subject a discovery answer may go to: an inbox, never one of our own subjects."""
    return reply.startswith(INBOX)


class _Service(Service):
    """nats.micro's Service, answering PING, INFO and STATS only to an inbox."""

    async def _handle_ping_request(self, msg) -> None:
        if answerable(msg.reply):
            await super()._handle_ping_request(msg)

    async def _handle_info_request(self, msg) -> None:
        if answerable(msg.reply):
            await super()._handle_info_request(msg)

    async def _handle_stats_request(self, msg) -> None:
        if answerable(msg.reply):
            await super()._handle_stats_request(msg)


class Registration(Lifecycle):
    """One service instance on the service API, from ``start`` to ``stop``.

    ``instance``: the id in its ``status`` endpoint's subject (a worker's id, so that the worker's
    NATS user may subscribe to its own only); the service API's own id where empty."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        name: str,
        *,
        description: str,
        counters: Counters,
        metadata: dict[str, str] | None = None,
        instance: str = "",
    ):
        self.nc, self.subjects, self.name = nc, subjects, name
        self.description, self.counters, self.instance = description, counters, instance
        self.metadata = {
            "prefix": subjects.prefix,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            **(metadata or {}),
        }
        self._service: _Service | None = None
        self._throttle = Throttle()
        self._log = structlog.get_logger().bind(service=name)

    @property
    def id(self) -> str:
        """The service API's id of this instance ("" before start)."""
        return self._service.id if self._service is not None else ""

    async def start(self) -> None:
        if self._service is not None:
            return
        config = ServiceConfig(
            name=self.name,
            version=version(),
            description=self.description,
            metadata=self.metadata,
            stats_handler=self._stats_data,
        )
        service = _Service(self.nc, config)
        await service.start()
        subject = self.subjects.service_status(self.name, self.instance or service.id)
        await service.add_endpoint(
            name="status", subject=subject, handler=self._on_status, metadata={"format": "json"}
        )
        self._service = service

    async def stop(self) -> None:
        service, self._service = self._service, None
        if service is not None:
            with contextlib.suppress(nats.errors.Error):  # a closed connection answers no one anyway
                await service.stop()

    def _read(self) -> dict:
        """The counters; a service whose counters fail still answers, with the error."""
        try:
            return self.counters()
        except Exception as exc:
            if self._throttle("counters"):
                self._log.exception("service_counters_failed")
            return {"error": repr(exc)[:200]}

    def _stats_data(self, _endpoint: EndpointStats) -> dict:
        return self._read()

    async def _on_status(self, request: Request) -> None:
        # Request has no public reply subject; its message has.
        if not answerable(request._msg.reply or ""):
            return
        with contextlib.suppress(nats.errors.Error):
            await request.respond(orjson.dumps({"name": self.name, "id": self.id, **self._read()}))


# --- asking --------------------------------------------------------------------------------------


class Answer(msgspec.Struct):
    """What ``first services`` reads of an answer (io.nats.micro.v1.*_response): untrusted, so
    typed; the rest passes through as it came."""

    type: str
    name: str
    id: str
    version: str = ""
    metadata: dict[str, str] = {}


_answer_decoder = msgspec.json.Decoder(Answer)


async def ask(
    nc: NATS,
    verb: str,
    *,
    name: str = "",
    prefix: str | None = None,
    quiet_s: float = 0.3,
    timeout_s: float = 2.0,
) -> list[dict]:
    """Every answer to one discovery request (many services answer one), one per instance,
    collected on an inbox: the first within ``timeout_s``, then until none came for ``quiet_s``.
    ``prefix``: only those of the deployment with this subject prefix (several may share a NATS
    server)."""
    if verb not in SERVICE_VERBS:
        raise ValueError(f"verb {verb!r} is not one of {', '.join(SERVICE_VERBS)}")
    wanted = f"io.nats.micro.v1.{verb.lower()}_response"
    answers: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)

    async def collect(msg) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            answers.put_nowait(msg.data)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    found: dict[str, dict] = {}
    try:
        await nc.publish(service_request(verb, name), b"", reply=inbox)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(min(quiet_s, left) if found else left):
                    data = await answers.get()
            except TimeoutError:
                break
            try:
                answer = _answer_decoder.decode(data)
            except msgspec.DecodeError:
                continue  # not a service's answer: someone else on the inbox, or garbage
            if answer.type != wanted or (prefix is not None and answer.metadata.get("prefix") != prefix):
                continue
            found[answer.id] = orjson.loads(data)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return sorted(found.values(), key=lambda a: (a["name"], a["id"]))
