"""The credential a request carries: ``Authorization: Bearer <token or key>``, FIRST's one form.

A credential in the query string is refused: URLs end up in proxy and server logs.
"""

from __future__ import annotations

from aiohttp import web

from shared import errors

_MISSING = "Error: Missing ('Authorization': 'Bearer <your-access-token>') in request headers."
_QUERY_NAMES = ("api_key", "api-key", "key", "token", "access_token")


def bearer(request: web.Request) -> str:
    """The credential, or Unauthorized with the message a FIRST user knows."""
    # request.query parses the URL (a few µs): only a request with a query string pays for it.
    if request.query_string and any(name in request.query for name in _QUERY_NAMES):
        raise errors.Unauthorized(
            "Credentials in the URL are refused (URLs are logged): send 'Authorization: Bearer <key>'."
        )
    header = request.headers.get("Authorization")
    if header is None:
        raise errors.Unauthorized(_MISSING)
    parts = header.split()
    if len(parts) != 2 or parts[0] != "Bearer":
        raise errors.Unauthorized(
            "Something went wrong while reading headers. Authorization type should be Bearer."
        )
    if len(parts[1]) > 4096:
        raise errors.Unauthorized("The credential is longer than any this service issues.")
    return parts[1]
