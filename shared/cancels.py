"""Cancels that routers and workers have seen lately, and whose they were.

A cancel can overtake its request (the caller leaves while a router hands it over), so both
remember cancels for a while. A cancel from the stack (the gateway, a router) stops any request;
one from a NATS-native caller (``<p>.v1.cancel.user.<name>``, which only that caller may publish)
stops only that caller's own requests.
"""

from __future__ import annotations

from shared import schema
from shared.book import RecentIds


def native_user(request: schema.InferRequest) -> str:
    """The NATS-native caller who sent the request; "" for requests from the stack's callers."""
    identity = request.identity
    return identity.user if identity is not None and identity.kind == "nats" else ""


def may_stop(owner: str, request: schema.InferRequest) -> bool:
    """``owner``: "" for the stack, else the NATS-native caller who sent the cancel."""
    return not owner or native_user(request) == owner


class Cancels:
    def __init__(self, ttl_s: float = 120.0):
        self._seen = RecentIds(ttl_s)  # "<owner>/<request id or run key>"

    def add(self, cancel: schema.Cancel, owner: str = "") -> None:
        rid = cancel.request_id
        self._seen.add(f"{owner}/{rid if cancel.attempt is None else schema.run_key(rid, cancel.attempt)}")

    def stops(self, request: schema.InferRequest) -> bool:
        """A cancel seen lately applies to this request (every attempt of it, or this one)."""
        keys = (request.request_id, schema.run_key(request.request_id, request.attempt))
        owners = {"", native_user(request)}
        return any(f"{owner}/{key}" in self._seen for owner in owners for key in keys)
