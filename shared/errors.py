"""Our error hierarchy. Deep code raises these; the edges map them to HTTP or to a wire ``Error``.

Each class carries the OpenAI error ``type``, a stable ``code`` and the HTTP status it maps to.
"""

from __future__ import annotations

import re

from shared import schema


class FirstError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def to_wire(self, request_id: str, attempt: int = 0) -> schema.Error:
        return schema.Error(
            request_id=request_id,
            code=self.code,
            message=self.message,
            status=self.status,
            param=self.param,
            retry_after_s=self.retry_after_s,
            attempt=attempt,
        )


class BadRequest(FirstError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class NotFound(FirstError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ClusterNotFound(NotFound):
    code = "cluster_not_found"  # FIRST's code


class EndpointNotFound(NotFound):
    code = "endpoint_not_found"  # FIRST's code: no such model on that cluster

    @classmethod
    def pinned(cls, cluster: str, framework: str, model: str) -> EndpointNotFound:
        """FIRST's refusal of ``/resource_server/<cluster>/<framework>/v1/...`` for a model not
        served there, naming the endpoint by FIRST's slug (Django's slugify of the three)."""
        slug = re.sub(r"[^\w\s-]", "", f"{cluster} {framework} {model.lower()}"[:400].lower())
        slug = re.sub(r"[-\s]+", "-", slug).strip("-_")
        return cls(f"The requested endpoint '{slug}' does not exist.")


class UnsupportedFramework(BadRequest):
    code = "unsupported_framework"  # FIRST's code: the path's framework serves nothing on that cluster


class ClusterUnderMaintenance(FirstError):
    """A request pinned to a cluster an operator put under maintenance (``first cluster``)."""

    status = 503
    type = "service_unavailable"
    code = "cluster_under_maintenance"  # FIRST's code


class Unauthorized(FirstError):
    """No credential, or one that is malformed, unknown, inactive, expired or revoked."""

    status = 401
    type = "authentication_error"
    code = "unauthorized"


class Forbidden(FirstError):
    """A valid identity that may not do this (its identity provider, its groups, the model)."""

    status = 403
    type = "permission_error"
    code = "permission_denied"


class RateLimited(FirstError):
    """Over a request or token limit; ``retry_after_s`` says when the window has room again."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Conflict(FirstError):
    """The request id is already in use (a NATS-native caller reused it): pick a new one."""

    status = 409
    type = "invalid_request_error"
    code = "duplicate_request"


class PayloadTooLarge(FirstError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class NoCapacity(FirstError):
    """No worker could take the request in time (cold model not up yet, queue full, no router)."""

    status = 503
    type = "service_unavailable"
    code = "no_capacity"


class ServiceUnavailable(FirstError):
    """A part of the service cannot be reached now (JetStream for batch mode, say): try again."""

    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class EngineError(FirstError):
    status = 502
    type = "server_error"
    code = "engine_error"


class EngineTimeout(FirstError):
    status = 504
    type = "timeout"
    code = "engine_timeout"


_BY_CODE: dict[str, type[FirstError]] = {
    cls.code: cls
    for cls in (
        FirstError,
        BadRequest,
        NotFound,
        ModelNotFound,
        ClusterNotFound,
        EndpointNotFound,
        UnsupportedFramework,
        ClusterUnderMaintenance,
        Unauthorized,
        Forbidden,
        RateLimited,
        Conflict,
        PayloadTooLarge,
        NoCapacity,
        EngineError,
        EngineTimeout,
    )
}


def from_wire(err: schema.Error) -> FirstError:
    """The exception a wire Error stands for; unknown codes keep their status and message."""
    cls = _BY_CODE.get(err.code)
    if cls is None:
        exc = FirstError(err.message, param=err.param, retry_after_s=err.retry_after_s)
        exc.status, exc.code = err.status, err.code
        return exc
    return cls(err.message, param=err.param, retry_after_s=err.retry_after_s)


# Refusals made at the gateway's HTTP edge, before anything is sent on; they never travel on the wire.


class RequestTimeout(FirstError):
    """The request body did not arrive whole within gateway.body_timeout_s."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class UnsupportedMediaType(FirstError):
    """The body is not declared ``application/json``."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class HeadersTooLarge(FirstError):
    """The request line or a header field is too long, or there are too many header fields."""

    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"
