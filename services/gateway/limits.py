"""The limits at the gateway's edge: the limiter as a resource of the app (``limits_ctx``), the
check before a request is submitted (``admit``), which also leaves OpenAI's x-ratelimit-* headers
in ``keys.ANSWER_HEADERS`` for every answer that follows (the request middleware adds them to
whole answers and errors, the handler to an event stream), and the count of an answer's tokens
(``spent``)."""

from __future__ import annotations

import functools

from aiohttp import web

from services.gateway import keys
from shared import config as cfg
from shared import errors, schema
from shared.limits import Limiter
from shared.limits_ledger import Standing
from shared.subjects import Subjects

LIMITER = web.AppKey("limiter", Limiter)  # only where limits apply (enabled)


def enabled(config: cfg.Config) -> bool:
    """An open deployment has only the anonymous caller, whom nothing limits: no limiter at all."""
    return "none" not in config.auth.methods


async def limits_ctx(app: web.Application):
    """The limiter, started after the NATS connection it shares counts over."""
    config = app[keys.CONFIG]
    limiter = Limiter(app[keys.NC], Subjects(config.nats.subject_prefix), config)
    await limiter.start()
    app[LIMITER] = limiter
    yield
    await limiter.stop()


def admit(request: web.Request, identity: schema.Identity, model: str) -> None:
    """Count the request against its caller's limits, or refuse it with 429 and Retry-After."""
    limiter = request.app.get(LIMITER)
    if limiter is None or (verdict := limiter.admit(identity, model)) is None:
        return
    request[keys.ANSWER_HEADERS] = rate_headers(verdict.standing)
    if verdict.refusal:
        if (metrics := request.app.get(keys.METRICS)) is not None:
            metrics.refused(model)
        wait = verdict.retry_after_s
        if (events := request.app.get(keys.EVENTS)) is not None:  # one a minute per user and model
            events.post(
                60.0, f"{identity.user}:{model}", "limit", "hit", model=model, user=identity.user,
                reason=verdict.refusal, retry_after_s=round(wait, 3),
            )  # fmt: skip
        raise errors.RateLimited(f"{verdict.refusal}; try again in {wait:.1f} s.", retry_after_s=wait)


def spent(
    request: web.Request, identity: schema.Identity, model: str, usage: schema.Usage | None, streamed: int
) -> None:
    """Count the tokens an answer used: its usage, or, for an answer cut short (the caller left, the
    engine failed), the text pieces that reached the caller, about a token each."""
    limiter = request.app.get(LIMITER)
    if limiter is not None:
        tokens = usage.prompt_tokens + usage.completion_tokens if usage is not None else streamed
        limiter.spent(identity, model, tokens)


def usage(request: web.Request, identity: schema.Identity) -> dict | None:
    """What the caller used in the current windows (/v1/whoami); None where nothing is limited."""
    limiter = request.app.get(LIMITER)
    if limiter is None or identity.kind == "anonymous":
        return None
    return limiter.usage(identity)


def rate_headers(s: Standing) -> list[tuple[str, str]]:
    """OpenAI's headers for the tightest request limit and the tightest token limit that apply."""
    headers = []
    if s.request_limit:
        headers += (
            ("x-ratelimit-limit-requests", _limit(s.request_limit)),
            ("x-ratelimit-remaining-requests", str(s.requests_left)),
            ("x-ratelimit-reset-requests", duration(s.requests_reset_s)),
        )
    if s.token_limit:
        headers += (
            ("x-ratelimit-limit-tokens", str(s.token_limit)),
            ("x-ratelimit-remaining-tokens", str(s.tokens_left)),
            ("x-ratelimit-reset-tokens", duration(s.tokens_reset_s)),
        )
    return headers


@functools.lru_cache(maxsize=64)
def _limit(limit: float) -> str:
    return f"{limit:g}"


def duration(seconds: float) -> str:
    """A duration as OpenAI writes it (Go's notation, to the millisecond): 0s, 950ms, 1.5s, 6m0s."""
    return _duration_ms(max(0, round(seconds * 1000)))


# Resets are at most a window (62 s) ahead: every one of them fits, once written (~4 MB at most).
@functools.lru_cache(maxsize=65_536)
def _duration_ms(ms: int) -> str:
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs
