"""One way to connect to NATS for every service: reconnect forever, and report trouble as log lines."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from shared import natsauth

_SEED = re.compile(rb"SU[A-Z2-7]{56}")


def credential_options(path: str) -> dict:
    """nats-py's keywords for a credentials file: a user JWT with its seed (``.creds``), or an nkey
    seed alone (what ``first up`` and ``first nats-auth`` write). Replies come to the user's own
    inbox prefix, the only one its permissions let it read (shared/natsauth.py)."""
    if not path:
        return {}
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read NATS credentials {path}: {exc.strerror}") from None
    seed = _SEED.search(text)
    if seed is None:
        raise OSError(f"NATS credentials {path} hold no user nkey seed")
    inbox = natsauth.inbox_prefix(natsauth.public_key(seed.group()))
    if b"BEGIN NATS USER JWT" in text:
        return {"user_credentials": path, "inbox_prefix": inbox}
    return {"nkeys_seed": path, "inbox_prefix": inbox}


async def connect(url: str, name: str, credentials: str = "") -> NATS:
    log = structlog.get_logger().bind(nats_client=name)

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=repr(exc))

    async def on_disconnect() -> None:
        log.info("nats_disconnected")

    async def on_reconnect() -> None:
        log.info("nats_reconnected")

    return await nats.connect(
        url,
        name=name,
        connect_timeout=5,
        max_reconnect_attempts=-1,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **credential_options(credentials),
    )


class ConnectFailed(Exception):
    """A command could not connect; the message says why, in one line."""


async def connect_once(url: str, name: str, credentials: str = "", timeout_s: float = 3.0) -> NATS:
    """For a command (``first keys``, ``first usage``): two quick tries and no reconnects, so it
    fails in seconds with one line instead of waiting for NATS for ever."""
    seen: list[Exception] = []

    async def note(exc: Exception) -> None:  # instead of nats-py's traceback on stderr
        seen.append(exc)

    try:
        options = credential_options(credentials)
    except OSError as exc:
        raise ConnectFailed(str(exc)) from None
    try:
        return await nats.connect(
            url,
            name=name,
            connect_timeout=timeout_s,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # nats-py counts the first connect against these too
            reconnect_time_wait=0.2,
            error_cb=note,
            **options,
        )
    except (nats.errors.Error, OSError, TimeoutError, ValueError) as exc:
        why = seen[-1] if seen else exc
        reason = getattr(why, "strerror", None) or str(why) or type(why).__name__
        raise ConnectFailed(f"cannot reach NATS at {url}: {reason}") from None


async def close(nc: NATS) -> None:
    """Drain (deliver what is pending, then close); a server already gone just closes."""
    try:
        await nc.drain()
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        structlog.get_logger().info("nats_closed_without_drain", reason=repr(exc))
        # A server killed under the connection can leave close() to find the socket gone too.
        with contextlib.suppress(nats.errors.Error, OSError):
            await nc.close()


async def unsubscribe(subs: list) -> None:
    """End these subscriptions (a connection already closed has ended them) and empty the list."""
    for sub in subs:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    subs.clear()
