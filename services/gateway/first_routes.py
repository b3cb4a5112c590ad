"""FIRST's routes under ``/resource_server``, in FIRST's JSON shapes, so that its users' scripts
(``/list-endpoints``, ``/<cluster>/jobs``, ``/<cluster>/models``, and the cluster-pinned
``/<cluster>/<framework>/v1/...``) keep working.

A pinned request is checked in FIRST's order: the cluster (404 ``cluster_not_found``), its
maintenance (503 ``cluster_under_maintenance``, with the operator's message), the framework (400
``unsupported_framework``), then the model on that cluster (404 ``endpoint_not_found``, in
services/gateway/handlers.py once the body is read); routers then run it on that cluster only.
Clusters under maintenance come from the bucket ``first cluster maintenance`` writes
(shared/clusterstate.py), followed here as in every router.

FIRST builds ``/jobs`` from ``qstat`` on the cluster; here it comes from the scaler's node table
(shared/nodes.py: each node a job with its batch job id, state, host, walltime and the scheduler's
reason) and what the routers know (heartbeats, ``StatusReply``): a node whose worker is ready is a
running job, one whose workers still load a starting one, one the batch system holds a queued one;
a worker no scaler started is a job of its own; a model whose requests wait with no worker of it on
the cluster is queued, and a model with nothing at all is stopped. Only what the caller may use is
shown.
"""

from __future__ import annotations

from aiohttp import web

from services.gateway import embeddings, handlers, keys
from services.gateway.middleware import json_response
from shared import access, clusterstate, errors, natsauth, nodes, schema
from shared.config import ClusterConfig, Config, ModelConfig
from shared.limits import limits_for
from shared.openai_protocol import ChatCompletionRequest, CompletionRequest

# What each framework of a cluster serves, as FIRST lists it (``cluster.openai_endpoints``).
OPENAI_ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    """Every cluster open to anyone: ``{name: not under maintenance}``."""
    config, maintenance = request.app[keys.CONFIG], request.app[keys.MAINTENANCE]
    return json_response(
        {
            c.name: maintenance.message(c.name) is None
            for c in config.clusters
            if not c.allowed_groups and not c.allowed_idp_domains
        }
    )


async def list_endpoints(request: web.Request) -> web.Response:
    config, identity = request.app[keys.CONFIG], request[keys.IDENTITY]
    clusters = {}
    for cluster in config.clusters:
        if not access.cluster_admits(identity, cluster, config):
            continue
        frameworks: dict[str, dict] = {}
        for model in _models_on(cluster, identity, config):
            entry = frameworks.setdefault(model.framework, {"models": [], "endpoints": OPENAI_ENDPOINTS})
            entry["models"].append(model.id)
        for entry in frameworks.values():
            entry["models"].sort()
        clusters[cluster.name] = {"base_url": f"/resource_server/{cluster.name}", "frameworks": frameworks}
    return json_response({"clusters": clusters})


async def models(request: web.Request) -> web.Response:
    config, identity = request.app[keys.CONFIG], request[keys.IDENTITY]
    cluster = _cluster(request)
    per_user = limits_for(identity, config).model_tokens_per_min if identity.kind != "anonymous" else 0
    found = []
    for model in sorted(_models_on(cluster, identity, config), key=lambda m: m.id.lower()):
        details = {"id": model.id, "object": "model", "cluster": cluster.name, "framework": model.framework}
        if model.tokens_per_min:
            details["rate_limit_token_per_minute"] = model.tokens_per_min
        if per_user:
            details["rate_limit_token_per_minute_per_user"] = per_user
        found.append(details)
    if (wanted := request.query.get("model_id")) is not None:
        found = [d for d in found if d["id"] == wanted]
        if not found:
            raise errors.EndpointNotFound(f"{wanted} model not found on cluster {cluster.name}.")
    return json_response(found)


async def jobs(request: web.Request) -> web.Response:
    config, identity = request.app[keys.CONFIG], request[keys.IDENTITY]
    cluster = _cluster(request)
    out: dict[str, list] = {k: [] for k in ("running", "queued", "stopped", "others")}
    out |= {"private_batch_running": [], "private_batch_queued": []}
    if request.app[keys.MAINTENANCE].message(cluster.name) is not None:  # FIRST: every model stopped
        out["stopped"] = [_job(m, cluster, "stopped") for m in _models_on(cluster, identity, config)]
        out["cluster_status"] = {}
        return json_response(out)
    try:
        live = {m.id: m for m in (await request.app[keys.CLIENT].status()).models}
    except errors.FirstError:
        live = {}  # no router answers: nothing is known to run
    # The scaler's nodes (batch jobs) on this cluster, from its node table.
    table = await nodes.try_read_nodes(request.app[keys.NC].jetstream(), natsauth.scaler_bucket(config))
    on_cluster = [n for n in table or [] if n.cluster == cluster.name]
    for model in _models_on(cluster, identity, config):
        here = [w for w in (live[model.id].workers if model.id in live else []) if w.cluster == cluster.name]
        states = {w.worker_id: w.state for w in here}
        jobs_of = [n for n in on_cluster if n.model == model.id]
        for node in jobs_of:
            state = nodes.model_status(node, states)
            out[_JOB_LISTS.get(state, "others")].append(nodes.job_info(node, model.framework, state))
        on_nodes = {w for n in jobs_of for w in n.workers}
        for w in here:
            if w.worker_id not in on_nodes:  # a worker no scaler started (`first worker` by hand)
                state = "running" if w.state == "ready" else "starting"
                out["running"].append(_job(model, cluster, state, job_id=w.worker_id, job_state="R"))
        status = live.get(model.id)
        if here or jobs_of:
            continue
        if status is not None and status.state in ("queued", "starting"):
            out["queued"].append(_job(model, cluster, "queued", job_state="Q"))
        else:
            out["stopped"].append(_job(model, cluster, "stopped"))
    # A worker slot is a NATS user; those of models the caller may not see are taken all the same.
    slots = {w.worker_id for s in live.values() for w in s.workers if w.cluster == cluster.name}
    slots |= {w for n in on_cluster if n.state not in ("stopped", "failed") for w in n.workers}
    out["cluster_status"] = {"free_nodes": max(0, cluster.max_nodes - len(slots))}
    return json_response(out)


# Where a node of each model status goes in FIRST's /jobs answer.
_JOB_LISTS = {"running": "running", "starting": "running", "queued": "queued"}


def _job(model: ModelConfig, cluster: ClusterConfig, state: str, **ids: str) -> dict:
    job = {"Models": model.id, "Framework": model.framework, "Cluster": cluster.name, "Model Status": state}
    if "job_id" in ids:
        job["Job ID"] = ids["job_id"]
    if "job_state" in ids:
        job["Job State"] = ids["job_state"]
    return job


def _cluster(request: web.Request) -> ClusterConfig:
    config, name = request.app[keys.CONFIG], request.match_info["cluster"]
    cluster = config.cluster(name)
    if cluster is None or not access.cluster_admits(request[keys.IDENTITY], cluster, config):
        raise errors.ClusterNotFound(f"The requested cluster '{name}' does not exist.")
    return cluster


async def pinned_chat_completions(request: web.Request) -> web.StreamResponse:
    return await handlers._infer(request, "chat", ChatCompletionRequest, _pinned(request))


async def pinned_completions(request: web.Request) -> web.StreamResponse:
    return await handlers._infer(request, "completion", CompletionRequest, _pinned(request))


async def pinned_embeddings(request: web.Request) -> web.Response:
    return await embeddings.embeddings(request, _pinned(request))


def _pinned(request: web.Request) -> str:
    """The path's cluster, if it exists for the caller, is in service and has the path's framework."""
    config = request.app[keys.CONFIG]
    cluster = _cluster(request)
    if (message := request.app[keys.MAINTENANCE].message(cluster.name)) is not None:
        raise errors.ClusterUnderMaintenance(message)
    framework = request.match_info["framework"]
    if all(framework != m.framework or cluster.name not in config.clusters_for(m) for m in config.models):
        raise errors.UnsupportedFramework(f"framework {framework} not available on cluster {cluster.name}.")
    return cluster.name


async def _maintenance_ctx(app: web.Application):
    follower = clusterstate.MaintenanceFollower(app[keys.NC], app[keys.CONFIG])
    app[keys.MAINTENANCE] = follower
    await follower.start()
    yield
    await follower.stop()


def _models_on(cluster: ClusterConfig, identity: schema.Identity, config: Config) -> list[ModelConfig]:
    return [m for m in config.models if access.may_use_on(identity, m, cluster, config)]


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/resource_server/health", health)
    r.add_get("/resource_server/status", status)
    r.add_get("/resource_server/list-endpoints", list_endpoints)
    r.add_get("/resource_server/{cluster}/models", models)
    r.add_get("/resource_server/{cluster}/jobs", jobs)
    pinned = "/resource_server/{cluster}/{framework}/v1"
    r.add_post(f"{pinned}/chat/completions", pinned_chat_completions)
    r.add_post(f"{pinned}/completions", pinned_completions)
    r.add_post(f"{pinned}/embeddings", pinned_embeddings)
    app.cleanup_ctx.append(_maintenance_ctx)  # after the NATS connection's: it reads with it
