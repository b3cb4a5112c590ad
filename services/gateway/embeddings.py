"""POST /v1/embeddings (and FIRST's paths to it): OpenAI's request, checked; the vectors, as floats
or base64, from the float32 bytes a worker sends (schema.Embedding)."""

from __future__ import annotations

import base64

from aiohttp import web

from services.gateway import handlers, keys, limits
from services.gateway.body import read_json_body
from services.gateway.metrics import Outcome
from services.gateway.middleware import REQUEST_ID_HEADER, json_response
from shared.openai_protocol import EmbeddingRequest, decode_request
from shared.vectors import inputs, unpack


async def embeddings(request: web.Request, cluster: str = "") -> web.Response:
    """``cluster``: FIRST's pinned path (services/gateway/first_routes.py checked the cluster)."""
    outcome = request[keys.OUTCOME] = Outcome("embedding")  # observed by the middleware at the end
    await read_json_body(request)
    raw = await request.read()
    req = decode_request(raw, EmbeddingRequest)
    inputs({"input": req.input})  # 400 unless strings or token ids, none empty
    name = handlers.admit(request, req.model, cluster)
    identity = request[keys.IDENTITY]
    who = None if identity.kind == "anonymous" else identity
    request_id = request[keys.REQUEST_ID]
    result = await request.app[keys.CLIENT].complete(
        name, "embedding", raw, request_id=request_id, identity=who, cluster=cluster
    )
    limits.spent(request, identity, name, result.usage, 0)
    outcome.cluster, outcome.prompt_tokens = result.cluster, result.usage.prompt_tokens
    data = []
    for index in sorted(result.embeddings):
        vector = result.embeddings[index]
        if req.dimensions is not None:  # OpenAI's models shorten and renormalize; ours only shorten
            vector = vector[: 4 * req.dimensions]
        embedding = base64.b64encode(vector).decode() if req.encoding_format == "base64" else unpack(vector)
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    body = {
        "object": "list",
        "data": data,
        "model": name,
        "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens},
    }
    return json_response(body, headers={REQUEST_ID_HEADER: request_id})
