"""The HTTP/1.1 server framing of the mock engine: parse requests from a buffer, build responses.

Just enough of RFC 9112 for clients that behave (keep-alive, pipelining, chunked request bodies)
and for those that do not: anything malformed is an ``HttpError``, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"})


class HttpError(Exception):
    """A request that cannot be read; answered with ``status``, then the connection is closed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


def parse_request(buf: bytearray) -> Request | None:
    """The first whole request in ``buf`` (removed from it), or None until one has arrived."""
    while buf.startswith(b"\r\n"):  # a client may send CRLF between requests
        del buf[:2]
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise HttpError(431, "request head too large")
        return None
    if end > MAX_HEAD:
        raise HttpError(431, "request head too large")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] not in _METHODS or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, "malformed header line")
        headers[name.lower()] = value.strip()
    start = end + 4
    if "chunked" in headers.get("transfer-encoding", "").lower():
        found = _chunked_body(buf, start)
        if found is None:
            return None
        body, consumed = found
    else:
        length = headers.get("content-length", "0")
        if not length.isdigit():
            raise HttpError(400, "bad Content-Length")
        if int(length) > MAX_BODY:
            raise HttpError(413, "request body too large")
        consumed = start + int(length)
        if len(buf) < consumed:
            return None
        body = bytes(buf[start:consumed])
    del buf[:consumed]
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    return Request(method, target.split("?", 1)[0], headers, body, keep_alive)


def _chunked_body(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """The decoded body and the end of the request, or None while incomplete."""
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(400, "bad chunk size") from None
        if size < 0 or len(body) + size > MAX_BODY:
            raise HttpError(413 if size > 0 else 400, "bad chunk size")
        pos = eol + 2
        if size == 0:
            trailers_end = buf.find(b"\r\n", pos)
            while trailers_end > pos:  # skip trailer fields
                pos = trailers_end + 2
                trailers_end = buf.find(b"\r\n", pos)
            return None if trailers_end < 0 else (bytes(body), trailers_end + 2)
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size : pos + size + 2] != b"\r\n":
            raise HttpError(400, "chunk not followed by CRLF")
        body += buf[pos : pos + size]
        pos += size + 2


def response(
    status: int, body: bytes | None, headers: list[tuple[str, str]] = (), *, close: bool = False
) -> bytes:
    """A whole response (JSON unless headers say otherwise), or with ``body=None`` the head of a
    chunked one."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}"]
    if not any(name.lower() == "content-type" for name, _ in headers):
        lines.append("Content-Type: application/json")
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Transfer-Encoding: chunked" if body is None else f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if body is None else head + body
