"""The body of a JSON endpoint: declared ``application/json``, and whole within a deadline.

Only JSON is taken. A page in a browser may POST text/plain, form-encoded or untyped bodies to
any origin without asking first (a CORS "simple" request); it cannot send application/json so.
The body is read here under ``gateway.body_timeout_s``, so that a client trickling it cannot hold
a connection; aiohttp keeps what was read, and the handler's own ``request.read()`` returns it.
"""

from __future__ import annotations

import asyncio

from aiohttp import hdrs, web

from services.gateway import keys
from services.gateway.clip import clip
from shared import errors

_UTF8 = ("utf-8", "utf8")


def check_media_type(request: web.Request) -> None:
    """415 unless the body is declared ``application/json`` (a charset, if any, must be UTF-8)."""
    given = request.headers.get(hdrs.CONTENT_TYPE)
    if given is None:
        raise errors.UnsupportedMediaType("The request has no Content-Type; send `application/json`.")
    if request.content_type != "application/json":
        raise errors.UnsupportedMediaType(
            f"Content-Type must be `application/json`, not {clip(given, 64)!r}."
        )
    charset = request.charset
    if charset is not None and charset.lower() not in _UTF8:
        raise errors.UnsupportedMediaType(f"JSON bodies are UTF-8, not {clip(charset, 32)!r}.")


async def read_json_body(request: web.Request) -> None:
    """Check the media type, then read the whole body in time (408) and intact (400)."""
    check_media_type(request)
    if request.content.is_eof():  # the whole body came with the head: nothing to wait for
        await request.read()
        return
    timeout = request.app[keys.CONFIG].gateway.body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            await request.read()
    except TimeoutError:
        # The rest would only trickle in: end the body here and close after the 408, rather than
        # let aiohttp linger reading it. (Bytes that still come are dropped once closing.)
        request.content.feed_eof()
        request.protocol.close()
        raise errors.RequestTimeout(f"The request body did not arrive within {timeout:g} s.") from None
    except web.RequestPayloadError as exc:
        # A broken chunked encoding or a body shorter than its Content-Length.
        raise errors.BadRequest(f"The request body could not be read: {clip(str(exc))}") from None
