"""The HTTP handlers: thin, they check the request, hand it to the NATS client and shape the answer."""

from __future__ import annotations

import time

import msgspec
import structlog
from aiohttp import web

from services.gateway import keys, limits
from services.gateway.body import read_json_body
from services.gateway.metrics import CLIENT_CLOSED, Outcome
from services.gateway.middleware import REQUEST_ID_HEADER, json_response
from services.gateway.sse import KEEPALIVE, ChunkFramer, EventStreamResponse, error_events
from shared import access, errors, schema
from shared.config import ModelConfig
from shared.limits import limits_for
from shared.openai_protocol import (
    SESSION_HEADER,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseShape,
    parse_request,
    session_key,
)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _infer(request, "chat", ChatCompletionRequest)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _infer(request, "completion", CompletionRequest)


async def _infer(
    request: web.Request, endpoint: schema.Endpoint, kind: type[msgspec.Struct], cluster: str = ""
) -> web.StreamResponse:
    """``cluster``: FIRST's pinned paths (services/gateway/first_routes.py checked the cluster)."""
    outcome = request[keys.OUTCOME] = Outcome(endpoint)  # observed by the middleware at the end
    await read_json_body(request)  # 415 unless JSON; 408 if the body trickles; then kept for read()
    raw = await request.read()
    req = parse_request(raw, kind)
    session = session_key(request.headers.get(SESSION_HEADER), req)
    name = admit(request, req.model, cluster)
    identity = request[keys.IDENTITY]
    who = None if identity.kind == "anonymous" else identity
    client = request.app[keys.CLIENT]
    request_id = request[keys.REQUEST_ID]
    shape = ResponseShape(endpoint, request_id, name, include_usage=req.include_usage)
    if not req.stream:
        result = await client.complete(
            name,
            endpoint,
            raw,
            request_id=request_id,
            identity=who,
            cluster=cluster,
            priority=req.priority,
            session=session,
        )
        limits.spent(request, identity, name, result.usage, 0)
        outcome.cluster, outcome.prompt_tokens = result.cluster, result.usage.prompt_tokens
        outcome.completion_tokens = result.usage.completion_tokens
        return json_response(shape.completion(result), headers={REQUEST_ID_HEADER: request_id})

    response: web.StreamResponse | None = None
    framer = ChunkFramer(shape)
    keepalive_s = request.app[keys.CONFIG].gateway.sse_keepalive_s
    usage, streamed, first_at = None, 0, 0.0
    async with client.open(
        name,
        endpoint,
        raw,
        request_id=request_id,
        keepalive_s=keepalive_s,
        identity=who,
        cluster=cluster,
        priority=req.priority,
        session=session,
    ) as answer:
        try:
            async for chunk in answer:
                if chunk is not None:
                    usage, streamed = chunk.usage or usage, streamed + len(chunk.deltas)
                    if not first_at:  # the time to first token, for the metrics
                        first_at = time.monotonic()
                if response is None:
                    # Headers go out with the first tokens (or once the wait is long enough to need
                    # keep-alives), so queueing and engine errors that come earlier keep their status.
                    response = EventStreamResponse(
                        request_id, REQUEST_ID_HEADER, request.get(keys.ANSWER_HEADERS, ())
                    )
                    await response.prepare(request)
                if chunk is None:  # the answer is still coming (queued, a cold start, the engine's queue)
                    await response.write(KEEPALIVE)
                elif chunk.done:  # the last events and the end of the body in one write
                    await response.write_eof(framer.frame(chunk))
                else:
                    await response.write(framer.frame(chunk))
        except errors.FirstError as exc:
            if response is None:
                raise
            outcome.status = exc.status  # the stream's status line said 200; the metrics say this
            await response.write_eof(error_events(exc))
        except ConnectionResetError:
            # The client went away mid-stream; leaving the block cancels the request on the worker.
            structlog.get_logger().info("client_disconnected")
            outcome.status = CLIENT_CLOSED
            return response
        finally:
            limits.spent(request, identity, name, usage, streamed)
            outcome.answered(answer.started, usage, streamed)
            outcome.first_at = first_at
    if response is None:
        raise errors.EngineError("the answer ended before it began")
    await response.write_eof()  # a no-op when the last chunk already ended the body
    return response


def admit(request: web.Request, requested: str, cluster: str = "") -> str:
    """The model a request names, let in or refused: not on the pinned path's cluster (404), not
    for this caller (403), over a limit (429). Its id, under which it is served and counted."""
    identity = request[keys.IDENTITY]
    name = requested  # unknown models: the router answers 404, as it does NATS callers
    model = request.app[keys.MODELS].get(requested)
    if cluster and not _served_on(request, cluster, model):
        raise errors.EndpointNotFound.pinned(cluster, request.match_info["framework"], requested)
    if model is not None:
        access.check(identity, model, request.app[keys.CONFIG])
        name = model.id  # an alias is served, counted and answered as the model's id
    request[keys.MODEL] = name
    limits.admit(request, identity, name)  # 429 when over; the answer gets x-ratelimit-* headers
    return name


def _served_on(request: web.Request, cluster: str, model: ModelConfig | None) -> bool:
    """The model is served on the pinned path's cluster, by the path's framework."""
    config = request.app[keys.CONFIG]
    return (
        model is not None
        and cluster in config.clusters_for(model)
        and model.framework == request.match_info["framework"]
    )


async def models(request: web.Request) -> web.Response:
    config = request.app[keys.CONFIG]
    try:
        live = {m.id: m for m in (await request.app[keys.CLIENT].status()).models}
    except errors.FirstError:
        live = {}  # no router: the models are still listed, all offline
    data = []
    identity = request[keys.IDENTITY]
    for model in config.models:
        if not access.may_use(identity, model, config):
            continue  # a model a caller may not use is not shown to them
        status = live.get(model.id)
        data.append(
            {
                "id": model.id,
                "object": "model",
                "created": 0,
                "owned_by": "first",
                "status": status.state if status else "offline",
                "clusters": config.clusters_for(model),
                "queued": status.queued if status else 0,
                "workers": len(status.workers) if status else 0,
            }
        )
    return json_response({"object": "list", "data": data})


async def whoami(request: web.Request) -> web.Response:
    """Who the caller is to this service: their identity, groups and limits, with the tokens per
    minute each model they may use serves to all its users together (``models.tokens_per_min``)."""
    identity = request[keys.IDENTITY]
    config = request.app[keys.CONFIG]
    body = msgspec.to_builtins(identity)
    body.setdefault("groups", [])
    body["limits"] = msgspec.to_builtins(limits_for(identity, config))
    if limits.enabled(config):  # an open deployment runs no limiter: nothing is enforced
        body["limits"]["models"] = {
            m.id: {"tokens_per_min": m.tokens_per_min}
            for m in config.models
            if m.tokens_per_min and access.may_use(identity, m, config)
        }
    if (used := limits.usage(request, identity)) is not None:
        body["usage"] = used
    return json_response(body)


async def first_whoami(request: web.Request) -> web.Response:
    """FIRST's /resource_server/whoami shape, for its users' scripts."""
    identity = request[keys.IDENTITY]
    return json_response(
        {
            "id": identity.user,
            "name": identity.name,
            "username": identity.username,
            "user_group_uuids": identity.groups,
            "idp_id": identity.idp_id or identity.idp,  # the domain where Globus named no provider
            "idp_name": identity.idp_name or identity.idp,
            "auth_service": "globus" if identity.kind.startswith("globus") else identity.kind,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus's scrape (services/gateway/metrics.py; docs/metrics.md)."""
    body, content_type = request.app[keys.METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def health(request: web.Request) -> web.Response:
    nc = request.app[keys.NC]
    ok = nc.is_connected
    return json_response({"status": "ok" if ok else "degraded", "nats": ok}, status=200 if ok else 503)
