"""Typed application keys: everything the gateway app holds, named in one place."""

from __future__ import annotations

from aiohttp import web
from nats.aio.client import Client as NATS

from services.gateway.metrics import GatewayMetrics, Outcome
from shared import schema
from shared.client import FirstClient, LocalRouter
from shared.clusterstate import MaintenanceFollower
from shared.config import Config
from shared.events import EventPublisher

CONFIG = web.AppKey("config", Config)
MODELS = web.AppKey("models", dict)  # model id -> shared.config.ModelConfig
NATS_URL = web.AppKey("nats_url", str)
NATS_CREDENTIALS = web.AppKey("nats_credentials", str)  # a seed or .creds file; "": none
NC = web.AppKey("nc", NATS)
CLIENT = web.AppKey("client", FirstClient)
AUTHENTICATORS = web.AppKey("authenticators", list)  # services.gateway.auth.base.Authenticator
# services.gateway.auth.failures.FailureGuard (not imported: the auth package imports this module)
AUTH_FAILURES = web.AppKey("auth_failures", object)
LOCAL_ROUTER = web.AppKey("local_router", LocalRouter)  # only where a router runs in this process
MAINTENANCE = web.AppKey("maintenance", MaintenanceFollower)  # clusters under maintenance
EVENTS = web.AppKey("events", EventPublisher)  # this gateway's operator events
METRICS = web.AppKey("metrics", GatewayMetrics)  # unless metrics.gateway = false

# Per request: set by the middleware and the handlers, read by the one log line per request.
REQUEST_ID = web.RequestKey("request_id", str)
MODEL = web.RequestKey("model", str)
IDENTITY = web.RequestKey("identity", schema.Identity)  # set by the auth middleware
# Headers every answer to the request carries, error or not (the limits' x-ratelimit-*).
ANSWER_HEADERS = web.RequestKey("answer_headers", list)
# An inference request's outcome for the metrics, filled by its handler (services/gateway/metrics.py).
OUTCOME = web.RequestKey("outcome", Outcome)
