"""Wire messages: every message on a FIRST subject is one of these msgspec Structs, msgpack-encoded.

Evolution rules (so old and new services can run side by side during a rolling upgrade):
new fields get defaults, existing field types never change, unknown fields are ignored
(no Struct here forbids them), and incompatible changes get a new protocol version in the
subjects (see ``shared.subjects.PROTOCOL``).

docs/protocol.md documents each subject and the messages it carries.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Endpoint = Literal["chat", "completion"]
WorkerState = Literal["starting", "loading", "ready", "draining", "stopped"]
NodeState = Literal["requested", "running", "failed", "stopping", "stopped"]
ModelState = Literal["live", "starting", "queued", "offline"]


class _Msg(msgspec.Struct, tag_field="kind", omit_defaults=True):
    """Base of every wire message: tagged by ``kind`` so one subject can carry several."""


# --- requests: client -> router -> worker -----------------------------------------------------


class InferRequest(_Msg, tag="infer"):
    """One OpenAI request. ``body`` is the client's JSON exactly as sent; only the engine reads it."""

    request_id: str
    model: str
    endpoint: Endpoint
    body: bytes
    reply_to: str  # stream subject: routers and the worker send Accepted/Started/Chunk/Error here
    created: float  # unix seconds, set by the client
    queue_timeout_s: float = 0.0  # 0: the router's default


class Cancel(_Msg, tag="cancel"):
    request_id: str
    reason: str = "client"


class Accepted(_Msg, tag="accepted"):
    """The router's NATS reply to an InferRequest on ``<prefix>.v1.infer`` (not sent on reply_to):
    it holds the request (queued) or has dispatched it."""

    request_id: str
    router_id: str
    queued: int = 0  # position in the model's queue; 0 means dispatched at once


class DispatchReply(_Msg, tag="dispatch_reply"):
    """The worker's reply to the router: accepted means the worker now owns the request."""

    accepted: bool
    reason: str = ""  # CANCELLED: the caller has gone; drop the request rather than try elsewhere


CANCELLED = "cancelled"


# --- the answer stream: router/worker -> client on InferRequest.reply_to -----------------------


class Usage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Delta(msgspec.Struct, omit_defaults=True):
    """Text for one choice. Several deltas in one Chunk are several engine tokens packed together."""

    text: str = ""
    index: int = 0
    finish_reason: str | None = None


class Started(_Msg, tag="started"):
    request_id: str
    worker_id: str
    cluster: str


class Chunk(_Msg, tag="chunk"):
    request_id: str
    seq: int  # 0, 1, 2 … per request: a gap means a lost message
    deltas: list[Delta] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    done: bool = False  # the last message of a successful answer


class Error(_Msg, tag="error"):
    """A failed request. ``code`` is stable (see shared.errors); ``status`` is the HTTP status it maps to."""

    request_id: str
    code: str
    message: str
    status: int = 500
    param: str | None = None
    retry_after_s: float | None = None


RouterReply = Accepted | Error
StreamMsg = Started | Chunk | Error


# --- control plane ----------------------------------------------------------------------------


class EngineLoad(msgspec.Struct, omit_defaults=True):
    """The engine's own view of its load, where it reports one (vLLM's /metrics, the simulator)."""

    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None


class Heartbeat(_Msg, tag="heartbeat"):
    worker_id: str
    cluster: str
    model: str
    state: WorkerState
    capacity: int
    in_flight: int
    interval_s: float  # the next heartbeat comes within this; routers forget a worker after a few misses
    idle_s: float = 0.0  # seconds since the last request ended; 0 while busy
    engine: EngineLoad = msgspec.field(default_factory=EngineLoad)
    node_id: str = ""
    sent: float = 0.0


class Demand(_Msg, tag="demand"):
    """Requests one router holds for a model because no worker could take them."""

    router_id: str
    model: str
    queued: int
    oldest_wait_s: float = 0.0
    interval_s: float = 1.0


class NodeEvent(_Msg, tag="node_event"):
    node_id: str
    cluster: str
    model: str
    provider: str
    state: NodeState
    reason: str = ""
    sent: float = 0.0


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


# One encoder and one decoder per subject's union, built once at import.
encoder = msgspec.msgpack.Encoder()
encode = encoder.encode

infer_decoder = msgspec.msgpack.Decoder(InferRequest)
router_reply_decoder = msgspec.msgpack.Decoder(RouterReply)
dispatch_reply_decoder = msgspec.msgpack.Decoder(DispatchReply)
stream_decoder = msgspec.msgpack.Decoder(StreamMsg)
cancel_decoder = msgspec.msgpack.Decoder(Cancel)
heartbeat_decoder = msgspec.msgpack.Decoder(Heartbeat)
demand_decoder = msgspec.msgpack.Decoder(Demand)
node_event_decoder = msgspec.msgpack.Decoder(NodeEvent)
status_request_decoder = msgspec.msgpack.Decoder(StatusRequest)
status_reply_decoder = msgspec.msgpack.Decoder(StatusReply)
