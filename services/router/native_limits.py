"""NATS-native callers under ``[limits]``, as the gateway holds its HTTP callers to them.

A request on ``<p>.v1.infer.user.<name>`` reaches a router without passing a gateway, so the router
checks it with the same ``Limiter`` (shared/limits.py) before it is queued: over a limit, its
caller gets ``RateLimited`` (429, with the retry time) on its reply stream and a ``limit.hit``
event goes out (once a minute per user and model). The routers' counts travel on ``<p>.v1.limits``
as the gateways' do, and both hear each other, so a model's ``tokens_per_min`` covers HTTP and NATS
callers together. Requests from the gateway and the batch service (``<p>.v1.infer``) are not
checked here: the gateway has counted them, and batches are deliberately not limited.

Tokens: the router never sees answers; the worker's ``UsageRecord`` on ``<p>.v1.usage`` says what
a run used. The routers read that subject in their queue group, so each record reaches one router
(one message per request of the whole deployment, not per router), which counts the runs of
NATS-native callers and shares them with everyone. Records of other callers are dropped before
they are decoded. None of this runs where nothing could be limited: an open deployment
(``auth.methods = ["none"]``, as the gateway's ``limits.enabled``) or one without ``nats.clients``
(with NATS permissions on, no one else may publish on ``infer.user.*``).
"""

from __future__ import annotations

import msgspec
import structlog
from nats.aio.client import Client as NATS

from shared import config as cfg
from shared import errors, schema
from shared.connect import unsubscribe
from shared.events import EventPublisher
from shared.lifecycle import Lifecycle
from shared.limits import Limiter
from shared.subjects import ROUTERS_QUEUE, Subjects
from shared.supervise import Throttle, guarded

HIT_EVENT_PERIOD_S = 60.0  # one limit.hit event per user and model at most, as the gateway sends
# A UsageRecord of a NATS-native caller holds its identity's kind, msgpack-encoded: any record
# without these bytes is someone else's, and is dropped without decoding.
_NATS_KIND = msgspec.msgpack.encode("nats")


def applies(config: cfg.Config) -> bool:
    """Whether NATS-native callers can be limited: limits are on (what services/gateway/limits.py
    ``enabled`` says for HTTP callers) and the config names NATS-native callers."""
    return "none" not in config.auth.methods and bool(config.nats.clients)


class NativeLimits(Lifecycle):
    """The router's side of the limits: ``admit`` a NATS-native caller's request, count its runs."""

    def __init__(self, nc: NATS, subjects: Subjects, config: cfg.Config, events: EventPublisher):
        """``events``: the router's own (their source, its id, also names its counts on the wire)."""
        self.nc, self.subjects, self.events = nc, subjects, events
        router_id = events.source
        self.limiter = Limiter(nc, subjects, config, gateway_id=router_id) if applies(config) else None
        self._models = config.model_names()  # an alias counts as its model
        self.runs_counted = 0
        self._subs: list = []
        self._started = False
        self._bad_input = Throttle()
        self._log = structlog.get_logger().bind(service="router", router_id=router_id)

    async def start(self) -> None:
        if self.limiter is None or self._started:
            return
        self._started = True  # stop() undoes whatever of this happened
        await self.limiter.start()
        self._subs = [await self.nc.subscribe(self.subjects.usage, queue=ROUTERS_QUEUE, cb=self._on_usage)]

    async def stop(self) -> None:
        if self.limiter is None or not self._started:
            return
        self._started = False
        await unsubscribe(self._subs)  # empties the list
        await self.limiter.stop()  # shares what it counted last

    def admit(self, request: schema.InferRequest) -> None:
        """Count a NATS-native caller's request (its identity set by callers.admit), or raise
        ``errors.RateLimited`` for its reply stream."""
        if self.limiter is None or request.identity is None:
            return
        model = self._models.get(request.model)
        model_id = model.id if model is not None else request.model
        verdict = self.limiter.admit(request.identity, model_id)
        if verdict is None or not verdict.refusal:
            return
        user, wait = request.identity.user, verdict.retry_after_s
        self.events.post(
            HIT_EVENT_PERIOD_S, f"{user}:{model_id}", "limit", "hit", model=model_id, user=user,
            reason=verdict.refusal, retry_after_s=round(wait, 3),
        )  # fmt: skip
        raise errors.RateLimited(f"{verdict.refusal}; try again in {wait:.1f} s.", retry_after_s=wait)

    @guarded
    async def _on_usage(self, msg) -> None:
        if _NATS_KIND not in msg.data:
            return  # an HTTP or batch caller's run: the gateway counted it, or nothing does
        try:
            record = schema.usage_decoder.decode(msg.data)
        except msgspec.DecodeError:
            if self._bad_input("usage"):
                self._log.warning("undecodable_usage_record", note="logged once a minute")
            return
        identity = record.identity
        if identity is None or identity.kind != "nats" or self.limiter is None:
            return
        self.limiter.spent(identity, record.model, record.prompt_tokens + record.completion_tokens)
        self.runs_counted += 1
