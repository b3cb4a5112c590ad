"""structlog, configured once per process: JSON lines off a TTY, a console renderer on one.

Modules call ``structlog.get_logger()`` and bind nothing at import. Per-request context goes
through ``structlog.contextvars.bound_contextvars(request_id=...)`` so one request can be followed
across the gateway, router and worker logs.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from typing import BinaryIO

import orjson
import structlog


def configure_logging(level: str = "info", *, service: str = "", json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _utc_timestamp,
    ]
    if service:
        processors.insert(1, _add_service(service))
    if json:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        lines = BufferedLines(sys.stderr.buffer)
        atexit.register(lines.flush)

        def factory(*_args) -> BufferedLines:
            return lines

    else:
        processors += [structlog.dev.ConsoleRenderer()]
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


_second = [-1, ""]  # the last whole second formatted, reused: strftime per line costs


def _utc_timestamp(_logger, _name, event_dict):
    """ISO 8601 in UTC with microseconds, as structlog's TimeStamper(fmt="iso", utc=True) writes it."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    event_dict["timestamp"] = f"{_second[1]}.{int((now - second) * 1e6):06d}Z"
    return event_dict


def _add_service(service: str) -> structlog.typing.Processor:
    def add(_logger, _name, event_dict):
        event_dict.setdefault("service", service)
        return event_dict

    return add


class BufferedLines:
    """JSON log lines to a binary stream. Info and debug lines wait in a buffer, written at most
    ``FLUSH_S`` later (or once it holds 64 KiB): a line per request would otherwise cost a write
    system call per request on the hot path. Warnings and errors are written at once, after
    everything logged before them, so a line that explains a failure is never the one lost."""

    FLUSH_S = 0.1
    LIMIT = 64 * 1024

    def __init__(self, file: BinaryIO):
        self._file = file
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._lock = threading.Lock()  # to_thread work may log too

    def _later(self, message: bytes) -> None:
        with self._lock:
            self._lines.append(message + b"\n")
            self._size += len(message) + 1
            if self._size < self.LIMIT and self._timer is None:
                try:
                    self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self.flush)
                    return
                except RuntimeError:  # no event loop here: write now
                    pass
            elif self._size < self.LIMIT:
                return
        self.flush()

    def _now(self, message: bytes) -> None:
        with self._lock:
            self._lines.append(message + b"\n")
        self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._lines, self._size = self._lines, [], 0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if lines:
            try:
                self._file.write(b"".join(lines))
                self._file.flush()
            except (OSError, ValueError):  # stderr closed (the parent is gone)
                pass

    msg = debug = info = _later
    warning = warn = error = err = critical = exception = fatal = failure = _now
