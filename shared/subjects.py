"""Every NATS subject and queue group, built in one place.

The protocol version is part of every subject (``<prefix>.v1.…``) so that a later, incompatible
protocol can run beside this one on the same NATS system. The prefix (default ``first``) lets
several deployments, or several test runs, share one NATS server without seeing each other.
Nothing outside this module spells a subject.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROTOCOL = "v1"
DEFAULT_PREFIX = "first"

# Queue groups: members of one group share the messages of a subject.
ROUTERS_QUEUE = "routers"

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def check_token(value: str, what: str) -> str:
    """A subject token: no dots, wildcards or spaces. Ids that travel in subjects must pass this."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{what} {value!r} may hold only letters, digits, '_' and '-'")
    return value


# NATS's service API (nats.micro; shared/discovery.py): outside our prefix, because that is where
# `nats micro ls|info|stats` ask: $SRV.<VERB>, $SRV.<VERB>.<name>, $SRV.<VERB>.<name>.<instance>.
SERVICE_API = "$SRV"
SERVICE_VERBS = ("PING", "INFO", "STATS")
GATEWAY_SERVICE, ROUTER_SERVICE = "first-gateway", "first-router"
SCALER_SERVICE, WORKER_SERVICE = "first-scaler", "first-worker"


def service_control(name: str) -> list[str]:
    """What a service of this name answers on: each verb asked of all, of its name, of one instance."""
    check_token(name, "service name")
    return [f"{SERVICE_API}.{v}{tail}" for v in SERVICE_VERBS for tail in ("", f".{name}", f".{name}.*")]


def service_discovery() -> list[str]:
    """What someone who discovers services asks on: the same three forms, for any name. Nothing
    else under $SRV: no one here answers there."""
    return [f"{SERVICE_API}.{v}{tail}" for v in SERVICE_VERBS for tail in ("", ".*", ".*.*")]


def service_request(verb: str, name: str = "", instance: str = "") -> str:
    """One discovery request: ``$SRV.PING``, ``$SRV.INFO.first-router``, ``$SRV.STATS.<name>.<id>``."""
    if verb not in SERVICE_VERBS:
        raise ValueError(f"verb {verb!r} is not one of {', '.join(SERVICE_VERBS)}")
    parts = [SERVICE_API, verb]
    if name:
        parts.append(check_token(name, "service name"))
        if instance:
            parts.append(check_token(instance, "service instance"))
    return ".".join(parts)


@dataclass(frozen=True, slots=True)
class Subjects:
    """Subject names under one prefix. ``Subjects("first").infer == "first.v1.infer"``."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        for part in self.prefix.split("."):
            check_token(part, "subject prefix part")

    @property
    def root(self) -> str:
        return f"{self.prefix}.{PROTOCOL}"

    # Client (gateway or NATS-native caller) -> routers, queue group ROUTERS_QUEUE. Request/reply.
    @property
    def infer(self) -> str:
        return f"{self.root}.infer"

    # A NATS-native caller -> routers, as itself: the user is the one its NATS credentials name
    # (the server lets it publish here only), so routers take the identity from the subject.
    def infer_user(self, user: str) -> str:
        return f"{self.root}.infer.user.{check_token(user, 'user')}"

    @property
    def infer_users(self) -> str:
        return f"{self.root}.infer.user.*"

    # Router -> one worker, with a reply subject from router_ack: the worker accepts or refuses.
    def worker_infer(self, worker_id: str) -> str:
        return f"{self.root}.worker.{check_token(worker_id, 'worker id')}.infer"

    # Caller or router -> one worker: stop a run there.
    def worker_cancel(self, worker_id: str) -> str:
        return f"{self.root}.worker.{check_token(worker_id, 'worker id')}.cancel"

    # Worker -> callers it runs requests for: RunsBeat, its liveness and what it holds.
    def worker_runs(self, worker_id: str) -> str:
        return f"{self.root}.worker.{check_token(worker_id, 'worker id')}.runs"

    # Scaler -> one worker: WorkerControl (drain and exit, or stop). Only the scaler may publish
    # here and only that worker reads it, so providers that cannot signal a node can release it.
    def worker_control(self, worker_id: str) -> str:
        return f"{self.root}.worker.{check_token(worker_id, 'worker id')}.control"

    @property
    def worker_control_all(self) -> str:
        return f"{self.root}.worker.*.control"

    @property
    def worker_cancel_all(self) -> str:
        return f"{self.root}.worker.*.cancel"

    @property
    def worker_infer_all(self) -> str:
        return f"{self.root}.worker.*.infer"

    @property
    def worker_runs_all(self) -> str:
        return f"{self.root}.worker.*.runs"

    @property
    def router_all(self) -> str:
        return f"{self.root}.router.>"

    @property
    def router_heartbeat_all(self) -> str:
        return f"{self.root}.router.*.heartbeat"

    @property
    def reply_all(self) -> str:
        return f"{self.root}.reply.>"

    # Caller -> every router (no queue group): stop this request; a router that handed it to a
    # worker passes the cancel on.
    @property
    def cancel(self) -> str:
        return f"{self.root}.cancel"

    # A NATS-native caller's cancels, as itself: routers and workers stop only that user's requests.
    def cancel_user(self, user: str) -> str:
        return f"{self.root}.cancel.user.{check_token(user, 'user')}"

    @property
    def cancel_users(self) -> str:
        return f"{self.root}.cancel.user.*"

    def worker_cancel_user(self, worker_id: str, user: str) -> str:
        return f"{self.worker_cancel(worker_id)}.user.{check_token(user, 'user')}"

    def worker_cancel_users(self, worker_id: str) -> str:
        return f"{self.worker_cancel(worker_id)}.user.*"

    def worker_cancel_user_all(self, user: str) -> str:
        return f"{self.root}.worker.*.cancel.user.{check_token(user, 'user')}"

    @property
    def worker_cancel_users_all(self) -> str:
        return f"{self.root}.worker.*.cancel.user.*"

    # Worker -> the router that dispatched: the DispatchReply for dispatch number ``n``.
    def router_ack(self, router_id: str, n: int) -> str:
        return f"{self.root}.router.{check_token(router_id, 'router id')}.ack.{n:d}"

    def router_ack_all(self, router_id: str) -> str:
        return f"{self.root}.router.{check_token(router_id, 'router id')}.ack.*"

    # Any router's dispatch replies: what a site's leaf node link may carry to the hub.
    @property
    def router_ack_any(self) -> str:
        return f"{self.root}.router.*.ack.*"

    # Router -> callers whose requests it holds: it is alive.
    def router_heartbeat(self, router_id: str) -> str:
        return f"{self.root}.router.{check_token(router_id, 'router id')}.heartbeat"

    # Worker -> accounting and operators: one UsageRecord per run.
    @property
    def usage(self) -> str:
        return f"{self.root}.usage"

    # Gateway -> every gateway: AdmittedRequests, so request limits hold across gateways.
    @property
    def limits(self) -> str:
        return f"{self.root}.limits"

    # Worker -> routers, scaler, operators.
    def heartbeat(self, cluster: str, worker_id: str) -> str:
        return (
            f"{self.root}.heartbeat.{check_token(cluster, 'cluster')}.{check_token(worker_id, 'worker id')}"
        )

    @property
    def heartbeat_all(self) -> str:
        return f"{self.root}.heartbeat.>"

    # Router -> scaler, other routers: requests waiting per model.
    @property
    def demand(self) -> str:
        return f"{self.root}.demand"

    # Operator events (JSON, shared/events.py): <kind>.<name>.<source>, e.g.
    # first.v1.events.node.running.scaler. JetStream keeps them (the events stream).
    def event(self, kind: str, name: str, source: str) -> str:
        return (
            f"{self.root}.events.{check_token(kind, 'event kind')}.{check_token(name, 'event name')}"
            f".{check_token(source, 'event source')}"
        )

    @property
    def events_all(self) -> str:
        return f"{self.root}.events.>"

    def events_of(self, kind: str, source: str = "*") -> str:
        """A kind's events; from one source only where given (what a role may publish)."""
        if source != "*":
            check_token(source, "event source")
        return f"{self.root}.events.{check_token(kind, 'event kind')}.*.{source}"

    # Scaler -> routers, operators: nodes requested, queued, running, failed, released.
    @property
    def node_events(self) -> str:
        return self.events_of("node")

    # Anyone -> routers (queue group): the models and their live status.
    @property
    def status(self) -> str:
        return f"{self.root}.status"

    # Operators -> one service instance: its micro ``status`` endpoint (shared/discovery.py).
    def service_status(self, name: str, instance: str) -> str:
        return f"{self.root}.service.{check_token(name, 'service name')}.{check_token(instance, 'instance')}.status"

    def service_status_all(self, name: str) -> str:
        return f"{self.root}.service.{check_token(name, 'service name')}.*.status"

    @property
    def service_status_any(self) -> str:
        return f"{self.root}.service.*.*.status"

    # Batch mode (shared/batchstore.py). Gateway -> batch service: a batch was created or asked
    # to cancel (BatchChanged); the service also rescans, so a lost nudge only delays.
    @property
    def batch_changed(self) -> str:
        return f"{self.root}.batch.changed"

    # The batch service's work queue: one message per valid input line, one subject per batch.
    def batch_lines(self, batch_id: str) -> str:
        return f"{self.root}.batch.lines.{check_token(batch_id, 'batch id')}"

    @property
    def batch_lines_all(self) -> str:
        return f"{self.root}.batch.lines.*"

    # Each input line's one result (the stream keeps at most one per subject), until the batch's
    # output files are written.
    def batch_result(self, batch_id: str, line: int) -> str:
        return f"{self.root}.batch.results.{check_token(batch_id, 'batch id')}.{line:d}"

    def batch_results(self, batch_id: str) -> str:
        return f"{self.root}.batch.results.{check_token(batch_id, 'batch id')}.*"

    @property
    def batch_results_all(self) -> str:
        return f"{self.root}.batch.results.*.*"

    # Per-caller stream subject: where routers and workers send a request's answer.
    def reply_stream(self, client_id: str, request_id: str) -> str:
        return (
            f"{self.root}.reply.{check_token(client_id, 'client id')}.{check_token(request_id, 'request id')}"
        )

    def reply_stream_all(self, client_id: str) -> str:
        return f"{self.root}.reply.{check_token(client_id, 'client id')}.*"
