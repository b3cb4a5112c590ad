"""structlog, configured once per process: JSON lines off a TTY, a console renderer on one.

Modules call ``structlog.get_logger()`` and bind nothing at import. Per-request context goes
through ``structlog.contextvars.bound_contextvars(request_id=...)`` so one request can be followed
across the gateway, router and worker logs.
"""

from __future__ import annotations

import logging
import sys

import orjson
import structlog


def configure_logging(level: str = "info", *, service: str = "", json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if service:
        processors.insert(1, _add_service(service))
    if json:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        processors += [structlog.dev.ConsoleRenderer()]
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def _add_service(service: str) -> structlog.typing.Processor:
    def add(_logger, _name, event_dict):
        event_dict.setdefault("service", service)
        return event_dict

    return add
