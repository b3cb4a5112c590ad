"""Server-sent events exactly as OpenAI sends them: ``data: {json}`` events, then ``data: [DONE]``."""

from __future__ import annotations

import orjson
from aiohttp import web

from shared import errors, schema
from shared.openai_protocol import ResponseShape, error_body

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see the stream is alive


class EventStreamResponse(web.StreamResponse):
    """An SSE response whose headers go out with its first events, in one write (aiohttp sends a
    StreamResponse's headers at once, on their own, unless told otherwise). When the whole answer
    came at once, headers, events and the end of the body are one system call."""

    _send_headers_immediately = False  # aiohttp >= 3.12; web.Response does the same

    def __init__(self, request_id: str, request_id_header: str, extra: list[tuple[str, str]] = ()):
        super().__init__(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                request_id_header: request_id,
            }
        )
        if extra:
            self.headers.extend(extra)


def event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_events(exc: errors.FirstError) -> bytes:
    """A failure after the stream began: an error event, then [DONE], so clients stop cleanly."""
    return event(error_body(exc)) + DONE


class ChunkFramer:
    """Turns one request's wire Chunks into SSE bytes: the role first, one finish_reason per choice,
    the usage chunk (when asked for) last. Tokens that travelled together in one Chunk become one
    event per choice (the engine produced them faster than they were sent)."""

    def __init__(self, shape: ResponseShape):
        self.shape = shape
        self._opened: set[int] = set()
        self._finished: set[int] = set()

    def _open(self, index: int, out: list[bytes]) -> None:
        if index not in self._opened:
            self._opened.add(index)
            if self.shape.endpoint == "chat":
                out.append(event(self.shape.chunk(index, text="", role=True)))

    def frame(self, chunk: schema.Chunk) -> bytes:
        out: list[bytes] = []
        texts: dict[int, list[str]] = {}
        finishes: dict[int, str] = {}
        for d in chunk.deltas:
            texts.setdefault(d.index, []).append(d.text)
            if d.finish_reason:
                finishes.setdefault(d.index, d.finish_reason)
        for index, parts in texts.items():
            self._open(index, out)
            if text := "".join(parts):
                out.append(event(self.shape.chunk(index, text=text)))
            if (finish := finishes.get(index)) and index not in self._finished:
                self._finished.add(index)
                out.append(event(self.shape.chunk(index, finish=finish)))
        if chunk.done:
            self._open(0, out)
            for index in sorted(self._opened - self._finished):
                self._finished.add(index)
                out.append(event(self.shape.chunk(index, finish="stop")))
            if self.shape.include_usage:
                out.append(event(self.shape.usage_chunk(chunk.usage or schema.Usage())))
            out.append(DONE)
        return b"".join(out)
