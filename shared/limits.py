"""Request and token limits per user and model (``[limits]``, ``models.tokens_per_min``): which
apply to an identity (``limits_for``), and the ``Limiter`` that enforces them across gateways.

Every gateway keeps its own counts (shared/limits_ledger.py) and checks a request against them
with dict work only: no NATS round trip on the request path. Each counts the requests it admits and
the tokens of the answers it delivers (the usage of an answer's last message, which it reads
anyway), and publishes what it counted on ``<p>.v1.limits`` (``AdmittedRequests``) at most every
SHARE_INTERVAL_S while there is any; every other gateway adds that to its counts, so another
gateway's requests and tokens count here up to that much late. No message per request is added:
reading every UsageRecord instead cost each gateway one NATS message per request of the whole
deployment (bench/auth.py). docs/config.md, "[limits]", says what is exact and what is approximate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from shared import config as cfg
from shared import schema
from shared.access_config import LimitSet
from shared.children import cancel_and_wait
from shared.connect import unsubscribe
from shared.lifecycle import Lifecycle
from shared.limits_ledger import Ledger, Verdict
from shared.subjects import Subjects
from shared.supervise import Throttle, every, guarded

UNLIMITED = LimitSet(requests_per_s=0, model_requests_per_s=0, tokens_per_min=0, model_tokens_per_min=0)
SHARE_INTERVAL_S = 0.1  # how late another gateway's requests may count here
SWEEP_INTERVAL_S = 5.0  # how often the counts of idle users are forgotten
_MAX_COUNTS_PER_MESSAGE = 1000  # 1000 x (two 256-character names + a count) stays under 1 MiB


def limits_for(identity: schema.Identity, config: cfg.Config) -> LimitSet:
    """The limits of an identity: the deployment's, or the most generous of its groups' overrides.
    An open deployment (``auth.methods = ["none"]``) has one anonymous user and no limits."""
    if identity.kind == "anonymous":
        return UNLIMITED
    sets = [config.limits.groups[g] for g in identity.groups if g in config.limits.groups]
    if not sets:
        return config.limits.user

    def most(field: str) -> float:
        values = [getattr(s, field) for s in sets]
        return 0 if 0 in values else max(values)  # 0 is no limit: the most generous of all

    return LimitSet(
        requests_per_s=most("requests_per_s"),
        model_requests_per_s=most("model_requests_per_s"),
        tokens_per_min=int(most("tokens_per_min")),
        model_tokens_per_min=int(most("model_tokens_per_min")),
    )


class Limiter(Lifecycle):
    """Counts what every gateway admits and what their answers spend; ``admit`` decides a request."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        config: cfg.Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        gateway_id: str = "",
    ):
        self.nc, self.subjects, self.config = nc, subjects, config
        self.gateway_id = gateway_id or f"gateway-{uuid.uuid4().hex[:8]}"
        self.ledger = Ledger(clock)
        self._models = {m.id: m for m in config.models}
        self._limits_of_groups: dict[tuple[str, ...], LimitSet] = {}  # limits_for, remembered
        self._next_sweep = 0.0
        self._bad_input = Throttle()
        self._subs: list = []
        self._task: asyncio.Task | None = None
        self._log = structlog.get_logger().bind(service="limiter", gateway_id=self.gateway_id)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._subs = [await self.nc.subscribe(self.subjects.limits, cb=self._on_admitted)]
        self._task = asyncio.create_task(every(SHARE_INTERVAL_S, self._tick, name="limiter"), name="limiter")

    async def stop(self) -> None:
        if self._task is None:
            return
        await cancel_and_wait(self._task)
        self._task = None
        await self._share()  # what this gateway admitted last still counts elsewhere
        await unsubscribe(self._subs)

    def admit(self, identity: schema.Identity, model_id: str) -> Verdict | None:
        """Admit and count one request, or refuse it (``Verdict.refusal``); None: an anonymous
        caller, whom nothing limits."""
        if identity.kind == "anonymous":
            return None
        model = self._models.get(model_id)
        limits = self._limits(identity)
        if model is None:  # the router answers 404; only the user's own limits count it
            return self.ledger.admit(identity.user, limits)
        return self.ledger.admit(identity.user, limits, model_id, model.tokens_per_min)

    def _limits(self, identity: schema.Identity) -> LimitSet:
        """limits_for, which depends only on the groups of an identity that is not anonymous:
        working it out costs a few µs per request where a user has groups."""
        if not identity.groups:
            return self.config.limits.user
        groups = tuple(identity.groups)
        limits = self._limits_of_groups.get(groups)
        if limits is None:
            if len(self._limits_of_groups) >= 10_000:  # bounded, whatever the identities
                self._limits_of_groups.clear()
            limits = self._limits_of_groups[groups] = limits_for(identity, self.config)
        return limits

    def spent(self, identity: schema.Identity, model_id: str, tokens: int) -> None:
        """The tokens (prompt + completion) an answer this gateway delivered used."""
        if identity.kind != "anonymous" and model_id in self._models:
            self.ledger.spent_here(identity.user, model_id, tokens)

    def usage(self, identity: schema.Identity) -> dict:
        return self.ledger.usage(identity.user, list(self._models))

    # --- what the others report ---------------------------------------------------------------

    @guarded
    async def _on_admitted(self, msg) -> None:
        try:
            admitted = schema.admitted_decoder.decode(msg.data)
        except msgspec.DecodeError:
            if self._bad_input("admitted"):
                self._log.warning("undecodable_admitted_requests", note="logged once a minute")
            return
        if admitted.gateway_id == self.gateway_id:
            return  # our own, counted when admitted
        for a in admitted.counts:
            model = a.model if a.model in self._models else None
            self.ledger.admitted_elsewhere(a.user, model, a.requests)
            if model is not None:
                self.ledger.spent(a.user, model, a.tokens, grow=False)

    # --- periodic -----------------------------------------------------------------------------

    async def _tick(self) -> None:
        await self._share()
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            self.ledger.sweep()

    async def _share(self) -> None:
        unshared = self.ledger.take_unshared()
        if not unshared:
            return
        counts = [schema.Admitted(user, n, model, tokens) for (user, model), (n, tokens) in unshared.items()]
        for i in range(0, len(counts), _MAX_COUNTS_PER_MESSAGE):
            message = schema.AdmittedRequests(self.gateway_id, counts[i : i + _MAX_COUNTS_PER_MESSAGE])
            # Lost while NATS is away: the others then undercount this gateway's last 0.1 s.
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(self.subjects.limits, schema.encode(message))
