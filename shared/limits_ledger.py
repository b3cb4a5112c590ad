"""What each user and model used lately, and whether one more request fits.

The counting behind the limits (shared/limits.py), with no NATS and an injected clock, so tests
drive it with a fake one. Requests count in a one-second window, tokens in a one-minute window
(shared/limits_window.py: never more than the limit in any stretch of the span; room comes back up
to one slot late). A request is admitted iff every count that applies is below its limit: a
request is not sized in advance, as in FIRST, so a token limit can be overshot by the requests
admitted while the count was still below it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from shared.access_config import LimitSet
from shared.limits_window import Window

REQUEST_SPAN_S, REQUEST_SLOTS = 1.0, 10  # a request leaves the count 1.0 to 1.1 s after it came
TOKEN_SPAN_S, TOKEN_SLOTS = 60.0, 30  # tokens leave it 60 to 62 s after their answer ended


@dataclass(slots=True)
class Standing:
    """Where a caller stands against the tightest of its request limits and of its token limits
    (the x-ratelimit-* headers). A limit of 0: none of that kind applies."""

    request_limit: float = 0.0
    requests_left: int = 0
    requests_reset_s: float = 0.0
    token_limit: int = 0
    tokens_left: int = 0
    tokens_reset_s: float = 0.0


@dataclass(slots=True)
class Verdict:
    standing: Standing
    refusal: str = ""  # which limit refused the request, in words; "": admitted
    retry_after_s: float = 0.0  # when every limit it was over has room again


@dataclass(slots=True)
class _Check:
    """One limit that applies to a request: which, where its count is kept, and the count now."""

    what: str
    window: Window
    key: Hashable
    limit: float
    count: int = 0


def _describe(what: str, limit: float, model: str | None) -> str:
    return {
        "requests_per_s": f"Too many requests: at most {limit:g} requests/s per user, all models together",
        "model_requests_per_s": f"Too many requests: at most {limit:g} requests/s per user for the model '{model}'",
        "tokens_per_min": f"Tokens/minute limit exceeded: {limit:g} tokens/min per user, all models together",
        "model_tokens_per_min": f"Tokens/minute limit exceeded: {limit:g} tokens/min per user for the model '{model}'",
        "model_total_tokens_per_min": f"Tokens/minute limit exceeded: the model '{model}' serves {limit:g} tokens/min to all users together",
    }[what]  # fmt: skip


class Ledger:
    def __init__(self, clock: Callable[[], float] = time.monotonic, *, max_keys: int = 100_000):
        self.clock = clock
        self.requests = Window(REQUEST_SPAN_S, REQUEST_SLOTS, max_keys=max_keys)  # user
        self.model_requests = Window(REQUEST_SPAN_S, REQUEST_SLOTS, max_keys=max_keys)  # (user, model)
        self.tokens = Window(TOKEN_SPAN_S, TOKEN_SLOTS, max_keys=max_keys)  # user
        self.model_tokens = Window(TOKEN_SPAN_S, TOKEN_SLOTS, max_keys=max_keys)  # (user, model)
        self.total_tokens = Window(TOKEN_SPAN_S, TOKEN_SLOTS, max_keys=max_keys)  # model, all users
        # Requests admitted and tokens spent here that the other gateways have not been told of,
        # by (user, model or ""): [requests, tokens].
        self.unshared: dict[tuple[str, str], list[int]] = {}

    def admit(self, user: str, limits: LimitSet, model: str | None = None, model_tpm: int = 0) -> Verdict:
        """Admit (and count) one request of ``user`` for ``model`` (None: not a model of the config,
        so only the user's own limits apply), or say which limit refuses it and for how long."""
        now = self.clock()
        pair = (user, model)
        requests: list[_Check] = []
        tokens: list[_Check] = []
        if limits.requests_per_s:
            requests.append(_Check("requests_per_s", self.requests, user, limits.requests_per_s))
        if limits.tokens_per_min:
            tokens.append(_Check("tokens_per_min", self.tokens, user, limits.tokens_per_min))
        if model is not None:
            if limits.model_requests_per_s:
                requests.append(
                    _Check("model_requests_per_s", self.model_requests, pair, limits.model_requests_per_s)
                )
            if limits.model_tokens_per_min:
                tokens.append(
                    _Check("model_tokens_per_min", self.model_tokens, pair, limits.model_tokens_per_min)
                )
            if model_tpm:
                tokens.append(_Check("model_total_tokens_per_min", self.total_tokens, model, model_tpm))
        refusal, wait = "", 0.0
        for c in (*requests, *tokens):
            c.count = c.window.count(c.key, now)
            if c.count >= c.limit and (w := c.window.room_in(c.key, now, c.limit)) >= wait:
                refusal, wait = _describe(c.what, c.limit, model), w  # the limit that holds it longest
        if not refusal:
            self.requests.add(user, 1, now)
            if model is not None:
                self.model_requests.add(pair, 1, now)
            shared = (user, model or "")
            if (unshared := self.unshared.get(shared)) is None:
                self.unshared[shared] = [1, 0]
            else:
                unshared[0] += 1
            for c in requests:
                c.count += 1
        standing = Standing()
        if requests:  # the tightest: the fewest requests left, then the lowest limit
            c = min(requests, key=lambda c: (math.ceil(c.limit) - c.count, c.limit))
            standing.request_limit, standing.requests_left = c.limit, max(0, math.ceil(c.limit) - c.count)
            standing.requests_reset_s = c.window.reset_in(c.key, now)
        if tokens:
            c = min(tokens, key=lambda c: (c.limit - c.count, c.limit))
            standing.token_limit, standing.tokens_left = int(c.limit), max(0, int(c.limit) - c.count)
            standing.tokens_reset_s = c.window.reset_in(c.key, now)
        return Verdict(standing, refusal, wait)

    def spent_here(self, user: str, model: str, tokens: int) -> None:
        """Tokens an answer this gateway delivered used: counted, and told to the others."""
        if tokens <= 0:
            return
        self.spent(user, model, tokens, grow=True)
        shared = (user, model)
        if (unshared := self.unshared.get(shared)) is None:
            self.unshared[shared] = [0, tokens]
        else:
            unshared[1] += tokens

    def spent(self, user: str | None, model: str, tokens: int, *, grow: bool = False) -> None:
        """Tokens that answers of ``model`` used for ``user`` (None: anonymous)."""
        if tokens <= 0:
            return
        now = self.clock()
        self.total_tokens.add(model, tokens, now, grow=grow)
        if user is not None:
            self.tokens.add(user, tokens, now, grow=grow)
            self.model_tokens.add((user, model), tokens, now, grow=grow)

    def admitted_elsewhere(self, user: str, model: str | None, n: int) -> None:
        """Requests another gateway admitted, counted as of now (they arrive up to one share
        interval late, and so also leave the window that much later)."""
        if n <= 0:
            return
        now = self.clock()
        self.requests.add(user, n, now, grow=False)
        if model is not None:
            self.model_requests.add((user, model), n, now, grow=False)

    def take_unshared(self) -> dict[tuple[str, str], list[int]]:
        """What to tell the others: [requests, tokens] by (user, model or "")."""
        taken, self.unshared = self.unshared, {}
        return taken

    def sweep(self) -> int:
        now = self.clock()
        windows = (self.requests, self.model_requests, self.tokens, self.model_tokens, self.total_tokens)
        return sum(w.sweep(now) for w in windows)

    def usage(self, user: str, models: list[str]) -> dict:
        """What ``user`` used in the current windows: overall, and per model where it used any."""
        now = self.clock()
        per_model = {}
        for model in models:
            requests = self.model_requests.count((user, model), now)
            tokens = self.model_tokens.count((user, model), now)
            if requests or tokens:
                per_model[model] = {"requests_per_s": requests, "tokens_per_min": tokens}
        return {
            "requests_per_s": self.requests.count(user, now),
            "tokens_per_min": self.tokens.count(user, now),
            "models": per_model,
        }
