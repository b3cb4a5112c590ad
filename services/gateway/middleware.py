"""Request ids, one log line per request, and every error as OpenAI's envelope."""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
from collections.abc import Awaitable, Callable

import orjson
import structlog
from aiohttp import web
from structlog.contextvars import bind_contextvars

from services.gateway import keys
from services.gateway.clip import clip
from services.gateway.metrics import CLIENT_CLOSED
from shared import errors
from shared.client import new_id
from shared.openai_protocol import error_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID_HEADER = "X-Request-Id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_log = structlog.get_logger()  # a lazy proxy: configured at first use, not at import

# aiohttp's own HTTP errors (unknown path, wrong method, body too large) in our envelope.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(exc: errors.FirstError) -> web.Response:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return json_response(error_body(exc), exc.status, headers)


def _from_http(exc: web.HTTPException) -> errors.FirstError:
    err = errors.FirstError(exc.reason if exc.status != 404 else "Not found: no such path.")
    err.status = exc.status
    err.code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
    err.type = "invalid_request_error" if exc.status < 500 else "server_error"
    if exc.status == 413:
        err.message = f"The request body is too large: {exc.text.rstrip('.')}."
    return err


def _observe(request: web.Request, status: int, started: float, ended: float) -> None:
    """An inference request's metrics, observed once, at its end (services/gateway/metrics.py)."""
    if (outcome := request.get(keys.OUTCOME)) is not None and (metrics := request.app.get(keys.METRICS)):
        metrics.observe(outcome, request.get(keys.MODEL), status, started, ended)


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Our id is always fresh: it names the request's NATS subjects, so two clients that send the
    # same X-Request-Id must not collide. Theirs is logged beside it to follow a request across systems.
    request_id = new_id()
    request[keys.REQUEST_ID] = request_id
    given = request.headers.get(REQUEST_ID_HEADER, "")
    client_id = {"client_request_id": given} if _SAFE_ID.fullmatch(given) else {}
    log = _log
    started = time.monotonic()
    # aiohttp runs each request in a task of its own, with a copy of the context: this binding
    # ends with the request.
    bind_contextvars(service="gateway", request_id=request_id, **client_id)
    try:
        response = await handler(request)
    except asyncio.CancelledError:  # the caller left before its answer began (server.py)
        _observe(request, CLIENT_CLOSED, started, time.monotonic())
        raise
    except errors.FirstError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(_from_http(exc))
    except Exception:
        log.exception("unhandled_error", path=clip(request.path))
        response = error_response(errors.FirstError("Internal error; it has been logged."))
    if not response.prepared:  # an event stream got these from its handler
        response.headers[REQUEST_ID_HEADER] = request_id
        if extra := request.get(keys.ANSWER_HEADERS):
            response.headers.extend(extra)  # names set nowhere else: no merge needed
    ended = time.monotonic()
    _observe(request, response.status, started, ended)
    # Everything the client chose is clipped: a line per request must stay a line. Written once
    # the response is on its way (call_soon keeps this context, and so the request id).
    asyncio.get_running_loop().call_soon(
        functools.partial(
            log.info,
            "http_request",
            method=clip(request.method),
            path=clip(request.path),
            status=response.status,
            model=clip(request.get(keys.MODEL)),
            seconds=round(ended - started, 4),
        )
    )
    return response
