"""The load generator's HTTP/1.1 client connection: one request at a time, answers read and checked.

A protocol rather than streams: the answer is parsed inside ``data_received`` (Content-Length or
chunked framing, SSE events as they arrive), so the client costs a few microseconds per answer
and the times it takes are those at which the bytes came in.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import orjson

# An event that carries text: a non-empty "text" (completions) or delta "content" (chat). A regex
# rather than a JSON decode per event keeps the client's cost per token under a microsecond.
_TEXT = re.compile(rb'"(?:text|content)"\s*:\s*"[^"]')
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER = range(6)


@dataclass(slots=True)
class Answer:
    error: str = ""  # "" when complete and well formed; else the HTTP status or what broke
    tokens: int = 0  # usage.completion_tokens; a stream without usage: its events carrying text
    text_events: int = 0  # streams: events carrying text (fewer than tokens where a server packs them)
    first_event: float = 0.0  # perf_counter() when the first `data:` event came (streams)
    finished: float = 0.0  # perf_counter() when the answer was complete
    keep_alive: bool = True


class BadAnswer(Exception):
    pass


class Connection(asyncio.Protocol):
    def __init__(self, stream: bool):
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._waiter: asyncio.Future | None = None
        self._buf = bytearray()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._finish(Answer(error="connection_lost"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is None:
            return
        try:
            self._parse()
        except BadAnswer as exc:
            self._finish(Answer(error=f"bad_http: {exc}", keep_alive=False))

    # -- the client's side

    def send(self, request: bytes) -> asyncio.Future[Answer]:
        self._waiter = asyncio.get_running_loop().create_future()
        self._state, self._need, self._status, self._keep_alive = _HEAD, 0, 0, True
        self._body = bytearray()  # whole answers
        self._events = bytearray()  # SSE text not yet split into events
        self._first = 0.0
        self._text_events = 0
        self._usage_tokens = -1
        self._done_seen = False
        self._broken = ""
        self._sse = False
        self.transport.write(request)
        return self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.lost = True

    # -- parsing

    def _finish(self, answer: Answer) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        while self._waiter is not None:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                self._head(bytes(buf[pos:end]))
                pos = end + 4
            elif state == _LENGTH or state == _CHUNK_DATA:
                take = min(self._need, len(buf) - pos)
                if take <= 0 and self._need:
                    break
                self._content(buf[pos : pos + take])
                pos += take
                self._need -= take
                if self._need == 0:
                    if state == _LENGTH:
                        self._complete()
                    else:
                        self._state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
                except ValueError:
                    raise BadAnswer("bad chunk size") from None
                pos = eol + 2
                self._need = size
                self._state = _CHUNK_DATA if size else _TRAILER
            elif state == _CHUNK_END:
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise BadAnswer("chunk not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            else:  # _TRAILER: fields until an empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                empty = eol == pos
                pos = eol + 2
                if empty:
                    self._complete()
        del buf[:pos]

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise BadAnswer("bad status line")
        self._status = int(parts[1])
        chunked, length = False, 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                self._keep_alive = value.strip().lower() != b"close"
            elif name == b"content-type":
                self._sse = b"text/event-stream" in value.lower()
        if chunked:
            self._state = _CHUNK_SIZE
        else:
            self._state, self._need = _LENGTH, length
            if length == 0:
                self._complete()

    def _content(self, data: bytearray) -> None:
        if self._status != 200:
            return  # an error's body: the status says enough
        if not self._sse:
            self._body += data
            return
        self._events += data.replace(b"\r\n", b"\n") if b"\r" in data else data
        events = self._events
        start = 0
        while (end := events.find(b"\n\n", start)) >= 0:
            self._event(bytes(events[start:end]))
            start = end + 2
        del events[:start]

    def _event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            if not self._first:
                self._first = time.perf_counter()
            data = line[5:].strip()
            if data == b"[DONE]":
                self._done_seen = True
                continue
            if not data.startswith(b"{"):
                self._broken = "bad_event"
            elif b'"error"' in data and _is_error(data):
                self._broken = "error_event"
            elif _TEXT.search(data):
                self._text_events += 1
            elif b'"usage"' in data:
                self._usage_tokens = _completion_tokens(data)

    def _complete(self) -> None:
        now = time.perf_counter()
        keep = self._keep_alive
        if self._status != 200:
            self._finish(Answer(error=str(self._status), finished=now, keep_alive=keep))
        elif self.stream:
            error = self._broken or ("" if self._sse and self._done_seen else "no_done")
            tokens = self._text_events if self._usage_tokens < 0 else self._usage_tokens
            self._finish(Answer(error, tokens, self._text_events, self._first, now, keep))
        else:
            self._finish(self._whole(now, keep))

    def _whole(self, now: float, keep: bool) -> Answer:
        try:
            payload = orjson.loads(self._body)
        except orjson.JSONDecodeError:
            return Answer(error="bad_json", finished=now, keep_alive=keep)
        if not isinstance(payload, dict) or not payload.get("choices"):
            return Answer(error="no_choices", finished=now, keep_alive=keep)
        usage = payload.get("usage") or {}
        return Answer("", int(usage.get("completion_tokens") or 0), 0, 0.0, now, keep)


def _is_error(data: bytes) -> bool:
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return True
    return not isinstance(payload, dict) or bool(payload.get("error"))


def _completion_tokens(data: bytes) -> int:
    """The usage chunk's completion_tokens (-1 if there is none)."""
    try:
        usage = orjson.loads(data).get("usage") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return -1
    value = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return value if isinstance(value, int) else -1
