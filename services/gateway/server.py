"""The gateway's HTTP server: aiohttp's, hardened where it meets the socket.

aiohttp parses requests in its protocol class, ``web_protocol.RequestHandler``. What its parser
refuses (a header over 8 KB, a malformed request line, a broken chunked body) it answers through
``RequestHandler.handle_error`` in plain text, logging a traceback; a connection that never sends
a whole request head is kept until ``keepalive_timeout``; connections are not counted.
``GatewayProtocol`` subclasses it: those refusals get OpenAI's envelope and one log line, a head
that does not arrive within ``gateway.header_timeout_s`` closes the connection, and connections
beyond ``gateway.max_connections`` get an immediate 503. ``GatewayRunner`` makes aiohttp's server
build it; nothing of aiohttp is patched.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from services.gateway.clip import clip
from services.gateway.middleware import REQUEST_ID_HEADER, json_response
from shared import errors
from shared.client import new_id
from shared.config import GatewayConfig
from shared.openai_protocol import error_body

# A refused connection may still be sending its request: it gets this long to read the 503.
REFUSED_LINGER_S = 2.0
RETRY_AFTER_S = 1
# Connections the kernel holds until they are accepted: enough for a burst (Linux caps it at
# net.core.somaxconn), so that a surge meets our 503 rather than a silently dropped handshake.
LISTEN_BACKLOG = 1024
# File descriptors the process needs besides its HTTP connections (NATS, logs, children).
FD_HEADROOM = 256


def refusal(exc: BaseException | None, status: int, max_headers: int = 128) -> errors.FirstError:
    """Our error for what aiohttp's parser refused (or, rarely, for an error no middleware caught)."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the limit of"
        return errors.HeadersTooLarge(f"The request line or a header field is longer than {limit} bytes.")
    if isinstance(exc, HttpProcessingError):
        reason = next(iter(str(exc.message).strip().splitlines()), "")
        if reason.startswith("Too many headers"):
            return errors.HeadersTooLarge(f"The request has more than {max_headers} header fields.")
        # aiohttp's reason names what was wrong; the offending bytes it quotes stay out.
        return errors.BadRequest(f"Malformed HTTP request: {clip(reason.rstrip(':.'), 80)}.")
    err = errors.FirstError("Internal error; it has been logged.")
    err.status = status
    return err


def _busy_response() -> bytes:
    """The whole HTTP answer to a connection over the limit, written before its request is read."""
    body = orjson.dumps(
        error_body(errors.NoCapacity("The gateway has too many open connections; retry shortly."))
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {RETRY_AFTER_S}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class GatewayProtocol(RequestHandler):
    """One connection: aiohttp's request handling, plus our refusals, head deadline and bound."""

    def __init__(self, manager: GatewayServer, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._gateway = manager
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._refused = False

    # --- the connection bound ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._gateway.admit():
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def _refuse(self, transport: Any) -> None:
        # Answer at once and stop sending; keep reading (and dropping) for a moment, since closing
        # a socket with unread input resets it and the client could lose the answer.
        self._refused = True
        transport.write(self._gateway.busy_response)
        if transport.can_write_eof():
            transport.write_eof()
        self._linger = self._loop.call_later(REFUSED_LINGER_S, transport.close)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            if self._linger is not None:
                self._linger.cancel()
            return
        self._cancel_head_timer()
        self._gateway.release()
        super().connection_lost(exc)

    # --- the head deadline ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # Between requests the connection idles under aiohttp's keepalive_timeout; the next
        # request's first byte starts its head's deadline.
        if self._head_timer is None and data and self._waiting_for_head():
            self._arm_head_timer()
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._cancel_head_timer()
            self._fail_body_on_parse_error()

    def _fail_body_on_parse_error(self) -> None:
        # A parse error inside a body (a broken chunk that came after the head) is queued by
        # aiohttp as one more request, while the body's reader waits for bytes that never come.
        # Fail that reader instead: the handler answers 400, then the connection closes.
        request = self._current_request
        error = getattr(self._messages[-1][0], "exc", None) if self._messages else None
        if request is None or not isinstance(error, HttpProcessingError):
            return
        self._messages.pop()
        reason = next(iter(str(error.message).strip().splitlines()), "malformed body")
        request.content.set_exception(web.RequestPayloadError(reason.rstrip(":.")))
        request.content.feed_eof()  # so aiohttp does not linger reading it
        self.close()

    def _waiting_for_head(self) -> bool:
        return self._waiter is not None and not self._waiter.done()

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._gateway.limits.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        structlog.get_logger().info(
            "http_header_timeout",
            service="gateway",
            peer=_peer(self.peername),
            seconds=self._gateway.limits.header_timeout_s,
        )
        self.force_close()

    # --- aiohttp's own refusals ----------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        err = refusal(exc, status, self.max_headers)
        request_id = new_id()
        log = structlog.get_logger().bind(service="gateway", request_id=request_id)
        if isinstance(exc, HttpProcessingError):
            log.info(
                "http_refused",
                status=err.status,
                code=err.code,
                reason=clip(err.message),
                peer=_peer(self.peername),
            )
        else:
            log.error("unhandled_error", status=status, exc_info=exc)
        if request.writer.output_size > 0:
            # As aiohttp does: a response has begun, so the connection can only be dropped.
            raise ConnectionError("the response had begun; no error response can follow")
        response = json_response(error_body(err), err.status, {REQUEST_ID_HEADER: request_id})
        response.force_close()
        return response


def _peer(peername: Any) -> str | None:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return None if peername is None else str(peername)


class GatewayServer(web.Server):
    """aiohttp's connection factory, building GatewayProtocol and counting open connections."""

    def __init__(self, handler: Any, *, request_factory: Any, limits: GatewayConfig, **protocol_kwargs: Any):
        # A client that disconnects cancels its handler, and so its request on the worker.
        super().__init__(
            handler, request_factory=request_factory, handler_cancellation=True, **protocol_kwargs
        )
        self.limits = limits
        self.open_connections = 0
        self.refused = 0  # connections refused since the limit was last reached
        self.busy_response = _busy_response()
        self._protocol_kwargs = protocol_kwargs
        self._protocol_loop = asyncio.get_running_loop()

    def __call__(self) -> GatewayProtocol:
        return GatewayProtocol(self, loop=self._protocol_loop, **self._protocol_kwargs)

    def admit(self) -> bool:
        if self.open_connections >= self.limits.max_connections:
            if self.refused == 0:
                structlog.get_logger().warning(
                    "http_connection_limit_reached",
                    service="gateway",
                    max_connections=self.limits.max_connections,
                )
            self.refused += 1
            return False
        self.open_connections += 1
        return True

    def release(self) -> None:
        self.open_connections -= 1
        if self.refused and self.open_connections < self.limits.max_connections:
            structlog.get_logger().info(
                "http_connection_limit_cleared", service="gateway", refused=self.refused
            )
            self.refused = 0


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose server is a GatewayServer: same app lifecycle, our connections."""

    def __init__(self, app: web.Application, limits: GatewayConfig):
        super().__init__(app, access_log=None)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup and freezes it
        return GatewayServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            limits=self._limits,
            keepalive_timeout=self._limits.keepalive_timeout_s,
            access_log=None,
        )


def raise_fd_limit(connections: int) -> None:
    """Each connection is a file descriptor: lift the soft limit (often 1024) so that
    ``max_connections`` is reached before the process runs out of them."""
    try:
        import resource
    except ImportError:  # not on Unix
        return
    needed = connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        structlog.get_logger().warning(
            "fd_limit_below_max_connections", service="gateway", limit=target, max_connections=connections
        )


async def serve(app: web.Application, host: str, port: int, limits: GatewayConfig) -> web.AppRunner:
    """Start serving ``app``; the caller cleans the returned runner up."""
    raise_fd_limit(limits.max_connections)
    runner = GatewayRunner(app, limits)
    try:
        await runner.setup()  # a start-up step that fails leaves the steps before it cleaned up
        await web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
