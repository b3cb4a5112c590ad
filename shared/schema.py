"""Wire messages: every message on a FIRST subject is one of these msgspec Structs, msgpack-encoded
(operator events excepted: JSON, see Event).

Evolution rules (so old and new services can run side by side during a rolling upgrade):
new fields get defaults, existing field types never change, unknown fields are ignored
(no Struct here forbids them), and incompatible changes get a new protocol version in the
subjects (see ``shared.subjects.PROTOCOL``).

Everything decoded from NATS is untrusted: ids that end up inside subjects, counts and intervals
carry constraints, so a malformed or hostile message fails to decode at the edge instead of
breaking a service later.

docs/protocol.md documents each subject and the messages it carries.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Endpoint = Literal["chat", "completion", "embedding"]
Priority = Literal["interactive", "batch"]
WorkerState = Literal["starting", "loading", "ready", "draining", "stopped"]
# queued: the batch system holds the job (its reason says why); requested: not confirmed yet.
NodeState = Literal["requested", "queued", "running", "failed", "stopping", "stopped"]
ModelState = Literal["live", "starting", "queued", "offline"]

# A single subject token (worker ids, cluster names, request ids) and a whole subject.
Token = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
Subject = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){0,15}$", max_length=512)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
Attempt = Annotated[int, msgspec.Meta(ge=0, le=1000)]
Capacity = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=1e9)]  # NaN and infinities fail too
Interval = Annotated[float, msgspec.Meta(gt=0, le=3600)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
ShortText = Annotated[str, msgspec.Meta(max_length=4096)]


class _Msg(msgspec.Struct, tag_field="kind", omit_defaults=True):
    """Base of every wire message: tagged by ``kind`` so one subject can carry several."""


# --- who calls ----------------------------------------------------------------------------------


IdentityKind = Literal["anonymous", "key", "globus", "globus_service", "nats"]


class Identity(msgspec.Struct, omit_defaults=True):
    """Who sent a request, as the gateway (or, for NATS-native callers, a router) established it.
    Never a credential: a key's id at most. Workers, limits and usage accounting read it."""

    user: Annotated[str, msgspec.Meta(max_length=256)]  # stable: a Globus identity id, a key's name
    kind: IdentityKind = "anonymous"
    name: Annotated[str, msgspec.Meta(max_length=256)] = ""
    username: Annotated[str, msgspec.Meta(max_length=256)] = ""  # alice@anl.gov
    idp: Annotated[str, msgspec.Meta(max_length=256)] = ""  # the identity provider's domain: anl.gov
    groups: Annotated[list[Annotated[str, msgspec.Meta(max_length=256)]], msgspec.Meta(max_length=1024)] = (
        msgspec.field(default_factory=list)
    )
    key_id: Annotated[str, msgspec.Meta(max_length=64)] = ""  # an API key's public id
    # Globus only, as FIRST's /resource_server/whoami and user records show them: the identity
    # provider's id (a UUID; a service account: its domain) and display name (a service account: its
    # issuer). Empty: the same as ``idp``.
    idp_id: Annotated[str, msgspec.Meta(max_length=256)] = ""
    idp_name: Annotated[str, msgspec.Meta(max_length=256)] = ""


ANONYMOUS = Identity(user="anonymous")


# --- requests: client -> router -> worker -----------------------------------------------------


class InferRequest(_Msg, tag="infer"):
    """One OpenAI request. ``body`` is the client's JSON exactly as sent; only the engine reads it."""

    request_id: Token
    model: Annotated[str, msgspec.Meta(max_length=256)]
    endpoint: Endpoint
    body: bytes
    reply_to: Subject  # the caller's stream subject: Accepted/Retry/Started/Chunk/Error go here
    created: float  # unix seconds, set by the client when it first sent the request
    queue_timeout_s: Seconds = 0.0  # 0: the router's default
    attempt: Attempt = 0  # 0, 1, 2 …: the caller's n-th submission of this request (see Retry)
    identity: Identity | None = None  # set by the gateway; None: an anonymous caller
    # The cluster the caller pinned it to (FIRST's /resource_server/<cluster>/...); "": any.
    cluster: Annotated[str, msgspec.Meta(max_length=128)] = ""
    # While it waits for a worker: interactive requests go before batch ones (OpenAI's
    # service_tier "flex" at the gateway; the batch service's), each class fair among its users.
    priority: Priority = "interactive"
    # Requests with the same session key go to the same worker while it has room (its prefix
    # cache): FIRST's X-ALCF-Session-ID header, OpenAI's prompt_cache_key, or its user.
    session: Annotated[str, msgspec.Meta(max_length=128)] = ""


class Cancel(_Msg, tag="cancel"):
    """Stop a request. Sent to every router (``<p>.v1.cancel``) or to one worker."""

    request_id: Token
    reason: ShortText = "client"
    attempt: Attempt | None = None  # None: every attempt


class DispatchReply(_Msg, tag="dispatch_reply"):
    """The worker's reply to a router's dispatch: accepted means the worker now owns the request."""

    accepted: bool
    reason: ShortText = ""  # CANCELLED: the caller has gone; DUPLICATE: this attempt already ran here
    in_flight: Count = 0  # the worker's requests after this decision: routers correct their count


CANCELLED = "cancelled"
DUPLICATE = "duplicate request"


# --- the answer stream: router/worker -> client on InferRequest.reply_to -----------------------


class Accepted(_Msg, tag="accepted"):
    """A router holds the request (no worker could take it at once). It sends heartbeats on
    ``<p>.v1.router.<router_id>.heartbeat`` while it lives; the caller watches them."""

    request_id: Token
    router_id: Token
    queued: Count = 0  # position in the model's queue
    interval_s: Interval = 1.0  # the router's heartbeat interval
    attempt: Attempt = 0


class Retry(_Msg, tag="retry"):
    """The holder gave the request up without running it (a dispatch that went unanswered, a
    router shutting down, a worker stopping before its first token): submit it again with
    ``attempt + 1``. A caller bound to a started run of this attempt ignores it."""

    request_id: Token
    attempt: Attempt = 0
    reason: ShortText = ""


class Usage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0


class Delta(msgspec.Struct, omit_defaults=True):
    """Text for one choice. Several deltas in one Chunk are several engine tokens packed together."""

    text: str = ""
    index: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    finish_reason: str | None = None


class Started(_Msg, tag="started"):
    """A worker runs the request. It lists its runs on ``<p>.v1.worker.<worker_id>.runs`` every
    ``interval_s``; the caller watches them until the answer ends. Sent on its own when the
    answer's first text is not ready within moments; else it rides in the first Chunk."""

    request_id: Token
    worker_id: Token
    cluster: Token
    interval_s: Interval = 2.0
    attempt: Attempt = 0


class Embedding(msgspec.Struct, omit_defaults=True):
    """One input's vector, as float32 little-endian bytes: OpenAI's ``encoding_format: base64`` is
    these bytes in base64, so the gateway sends either form without converting through floats."""

    vector: Annotated[bytes, msgspec.Meta(max_length=1 << 20)]
    index: Count = 0


class Chunk(_Msg, tag="chunk"):
    request_id: Token
    seq: Count  # 0, 1, 2 … per run: a gap means a lost message
    deltas: list[Delta] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    done: bool = False  # the last message of a successful answer
    attempt: Attempt = 0
    # On a run's first Chunk when its Started was not sent on its own (the text came quickly):
    # one message instead of two.
    started: Started | None = None
    embeddings: list[Embedding] = msgspec.field(default_factory=list)  # an embedding run's vectors


class Error(_Msg, tag="error"):
    """A failed request. ``code`` is stable (see shared.errors); ``status`` is the HTTP status it maps to."""

    request_id: str
    code: ShortText
    message: ShortText
    status: Annotated[int, msgspec.Meta(ge=400, le=599)] = 500
    param: ShortText | None = None
    retry_after_s: Seconds | None = None
    attempt: Attempt = 0


StreamMsg = Accepted | Retry | Started | Chunk | Error


# --- control plane ----------------------------------------------------------------------------


class EngineLoad(msgspec.Struct, omit_defaults=True):
    """The engine's own view of its load, where it reports one (vLLM's /metrics, the simulator)."""

    running: Count | None = None
    waiting: Count | None = None
    kv_cache_usage: Fraction | None = None


class Heartbeat(_Msg, tag="heartbeat"):
    worker_id: Token
    cluster: Token
    model: Annotated[str, msgspec.Meta(max_length=256)]
    state: WorkerState
    capacity: Capacity
    in_flight: Count
    interval_s: Interval  # the next heartbeat comes within this; routers forget a worker after a few misses
    idle_s: Seconds = 0.0  # seconds since the last request ended; 0 while busy
    engine: EngineLoad = msgspec.field(default_factory=EngineLoad)
    node_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    sent: float = 0.0
    framework: Annotated[str, msgspec.Meta(max_length=64)] = ""  # what serves it: vllm, llamacpp, sim, api
    # When (unix s) the worker begins to drain because its node's walltime ends (0: no walltime):
    # the scaler starts a replacement ahead of it while demand remains.
    drain_at: Annotated[float, msgspec.Meta(ge=0, le=1e11)] = 0.0


class WorkerControl(_Msg, tag="worker_control"):
    """Scaler -> one worker, on its control subject: ``drain`` (take nothing new, finish what it
    runs, exit) or ``stop`` (exit now; runs not yet answering go back to their callers)."""

    action: Literal["drain", "stop"]
    reason: ShortText = ""
    sent: float = 0.0


class RunsBeat(_Msg, tag="runs"):
    """The runs a worker holds, every heartbeat interval while it holds any (and once more after
    the last ends). Callers whose requests it runs watch these instead of the worker's heartbeat:
    a run missing from them, whose answer never came, was lost (its end went astray in a NATS
    outage, say), and its caller runs it again or reports the loss."""

    worker_id: Token
    interval_s: Interval
    runs: Annotated[list[str], msgspec.Meta(max_length=100_000)] = msgspec.field(default_factory=list)
    sent: float = 0.0


def run_key(request_id: str, attempt: int) -> str:
    """How a run is named in RunsBeat.runs."""
    return f"{request_id}:{attempt}"


class RouterBeat(_Msg, tag="router_heartbeat"):
    """A router is alive; callers whose requests it holds watch these."""

    router_id: Token
    interval_s: Interval
    held: Count = 0
    sent: float = 0.0


class Demand(_Msg, tag="demand"):
    """Requests one router holds for a model because no worker could take them."""

    router_id: Token
    model: Annotated[str, msgspec.Meta(max_length=256)]
    queued: Count
    oldest_wait_s: Seconds = 0.0
    interval_s: Interval = 1.0
    cluster: Annotated[str, msgspec.Meta(max_length=128)] = ""  # requests pinned to it; "": any cluster


# --- operator events: JSON on <p>.v1.events.<kind>.<name>.<source> (shared/events.py) ---------

_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_Id = Annotated[str, msgspec.Meta(max_length=256)]


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Something an operator cares about: a node requested, a worker lost, requests held, a limit
    hit. The one message that is JSON, not msgpack: events are few, and ``nats sub`` and
    ``nats stream view`` show them as text. Kinds and names: docs/protocol.md, "Events"."""

    kind: _Name  # node, worker, scale, request, limit, batch, config
    name: _Name  # what happened: requested, running, lost, held, hit, progress ...
    time: float  # unix seconds
    source: Token  # who says so: "scaler", a router's, gateway's or worker's id, "batch"
    cluster: _Id = ""
    model: _Id = ""
    node_id: _Id = ""
    worker_id: _Id = ""
    request_id: _Id = ""
    user: _Id = ""
    reason: ShortText = ""
    data: Annotated[dict[str, object], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=dict)


# --- the scaler's state in JetStream KV (services/scaler/nodetable.py, lease.py) ---------------

UnixTime = Annotated[float, msgspec.Meta(ge=0, le=1e11)]


class NodeEntry(_Msg, tag="node"):
    """One node the scaler asked a provider for, under ``node.<node_id>`` in the scaler's bucket:
    what a restarted or standby scaler adopts, and what /jobs and ``first status`` show."""

    node_id: Token
    model: Annotated[str, msgspec.Meta(max_length=256)]
    cluster: Token
    provider: Annotated[str, msgspec.Meta(max_length=64)]
    state: NodeState
    workers: Annotated[list[Token], msgspec.Meta(max_length=256)] = msgspec.field(default_factory=list)
    reason: ShortText = ""
    requested_at: UnixTime = 0.0
    walltime_s: Seconds | None = None
    job_id: Annotated[str, msgspec.Meta(max_length=512)] = ""  # the provider's handle (adopt)
    job_state: Annotated[str, msgspec.Meta(max_length=64)] = ""  # the scheduler's own word: PENDING
    host: Annotated[str, msgspec.Meta(max_length=512)] = ""
    nodes_reserved: Count = 1
    estimated_start: UnixTime | None = None  # where the scheduler gives one
    updated: UnixTime = 0.0


class Lease(_Msg, tag="lease"):
    """Who acts (key ``lease`` of the scaler's bucket, of the batches bucket; shared/lease.py):
    renewed with a revision-checked update; a standby takes it over when its revision stops
    moving for ``ttl_s``. ``holder`` empty: handed back."""

    holder: Annotated[str, msgspec.Meta(max_length=128)]
    ttl_s: Interval
    sent: float = 0.0


class UsageRecord(_Msg, tag="usage"):
    """One run of a request on a worker, whatever its outcome: the tokens it produced so far."""

    request_id: Token
    model: str
    endpoint: Endpoint
    worker_id: Token
    cluster: Token
    outcome: str  # "ok", "cancelled", or the error code
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    ttft_s: Seconds | None = None  # first token after the worker took the request
    duration_s: Seconds = 0.0
    attempt: Attempt = 0
    created: float = 0.0  # when the caller first sent the request
    sent: float = 0.0
    identity: Identity | None = None  # who asked (None: anonymous)


class Admitted(msgspec.Struct, omit_defaults=True):
    """Requests of one user (for one model) that a gateway admitted, and the tokens their answers
    used (prompt + completion, counted when an answer ends)."""

    user: Annotated[str, msgspec.Meta(max_length=256)]
    requests: Count
    model: Annotated[str, msgspec.Meta(max_length=256)] = ""  # "": a model not in the config
    tokens: Count = 0


class AdmittedRequests(_Msg, tag="admitted"):
    """What one gateway admitted and spent since its last AdmittedRequests (sent at most every
    0.1 s, and only when there is any): every other gateway counts it against the limits."""

    gateway_id: Token
    counts: Annotated[list[Admitted], msgspec.Meta(max_length=10_000)] = msgspec.field(default_factory=list)


class StatusRequest(_Msg, tag="status_request"):
    pass


class WorkerInfo(msgspec.Struct, omit_defaults=True):
    worker_id: str
    cluster: str
    state: WorkerState
    capacity: int
    in_flight: int


class ModelStatus(msgspec.Struct, omit_defaults=True):
    id: str
    state: ModelState
    clusters: list[str] = msgspec.field(default_factory=list)
    queued: int = 0
    nodes_starting: int = 0
    workers: list[WorkerInfo] = msgspec.field(default_factory=list)


class StatusReply(_Msg, tag="status_reply"):
    router_id: str
    models: list[ModelStatus]


# --- batch mode: files in the Object Store, batches in KV, lines and results in streams --------
# (shared/batchstore.py, services/batch, docs/batch.md)

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
UserName = Annotated[str, msgspec.Meta(max_length=256)]


class FileRecord(msgspec.Struct, omit_defaults=True):
    """An uploaded or output file: JSON in its Object Store entry's description."""

    id: Token
    owner: UserName  # Identity.user of who uploaded it (or whose batch wrote it)
    filename: ShortText
    purpose: Annotated[str, msgspec.Meta(max_length=64)]
    bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    created_at: int = 0
    expires_at: int = 0


class BatchError(msgspec.Struct, omit_defaults=True):
    """Why a batch failed as a whole (OpenAI's ``errors.data[]``)."""

    code: ShortText
    message: ShortText
    line: int | None = None
    param: ShortText | None = None


class BatchRecord(msgspec.Struct, omit_defaults=True):
    """One batch, as kept in the batches KV bucket (key ``<owner key>.<batch id>``). The gateway
    creates it and may move it to cancelling; the batch service moves it on from there."""

    id: Token
    owner: UserName
    input_file_id: Token
    endpoint: BatchEndpoint
    completion_window: Annotated[str, msgspec.Meta(max_length=16)]
    created_at: int
    expires_at: int
    status: BatchStatus = "validating"
    identity: Identity | None = None  # who the lines run as (None: anonymous)
    metadata: dict[str, str] | None = None
    # FIRST's batch route: the model every line runs on, and the cluster it is pinned to.
    model: Annotated[str, msgspec.Meta(max_length=256)] = ""
    cluster: Annotated[str, msgspec.Meta(max_length=128)] = ""
    framework: Annotated[str, msgspec.Meta(max_length=64)] = ""
    total: Count = 0
    completed: Count = 0
    failed: Count = 0
    output_file_id: str = ""
    error_file_id: str = ""
    errors: list[BatchError] = msgspec.field(default_factory=list)
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None


class BatchChanged(_Msg, tag="batch_changed"):
    """Gateway -> batch service: the batch under this KV key was created or asked to cancel."""

    key: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{1,128}$")]


class BatchLine(_Msg, tag="batch_line"):
    """One valid input line, queued for the request path."""

    line: Count  # its number in the input file, from 1
    custom_id: Annotated[str, msgspec.Meta(max_length=4096)]
    model: Annotated[str, msgspec.Meta(max_length=256)]
    endpoint: Endpoint
    body: bytes  # the line's ``body``, as the user wrote it


class BatchResult(_Msg, tag="batch_result"):
    """One line's answer or error, as the JSON line of the output (ok) or error file."""

    line: Count
    ok: bool
    output: bytes


# One encoder and one decoder per subject's union, built once at import.
encoder = msgspec.msgpack.Encoder()
encode = encoder.encode

infer_decoder = msgspec.msgpack.Decoder(InferRequest)
dispatch_reply_decoder = msgspec.msgpack.Decoder(DispatchReply)
stream_decoder = msgspec.msgpack.Decoder(StreamMsg)
cancel_decoder = msgspec.msgpack.Decoder(Cancel)
heartbeat_decoder = msgspec.msgpack.Decoder(Heartbeat)
router_beat_decoder = msgspec.msgpack.Decoder(RouterBeat)
runs_beat_decoder = msgspec.msgpack.Decoder(RunsBeat)
demand_decoder = msgspec.msgpack.Decoder(Demand)
worker_control_decoder = msgspec.msgpack.Decoder(WorkerControl)
node_entry_decoder = msgspec.msgpack.Decoder(NodeEntry)
lease_decoder = msgspec.msgpack.Decoder(Lease)
event_decoder = msgspec.json.Decoder(Event)
usage_decoder = msgspec.msgpack.Decoder(UsageRecord)
admitted_decoder = msgspec.msgpack.Decoder(AdmittedRequests)
status_request_decoder = msgspec.msgpack.Decoder(StatusRequest)
status_reply_decoder = msgspec.msgpack.Decoder(StatusReply)
batch_record_decoder = msgspec.msgpack.Decoder(BatchRecord)
batch_changed_decoder = msgspec.msgpack.Decoder(BatchChanged)
batch_line_decoder = msgspec.msgpack.Decoder(BatchLine)
batch_result_decoder = msgspec.msgpack.Decoder(BatchResult)
file_record_decoder = msgspec.json.Decoder(FileRecord)
