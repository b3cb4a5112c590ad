"""Which NATS server an admin command (``first keys``, ``first usage``) talks to, as whom.

``--nats`` or ``nats.url``, with ``--credentials`` or ``nats.credentials``. Where neither names a
URL, the config's embedded server: ``first up`` writes its URL to ``<embedded_store_dir>/url`` and
the admin seed to ``<embedded_store_dir>/credentials/admin.nk``, so ``first keys create`` on the
same config needs no more arguments while that stack runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable
from pathlib import Path

from nats.aio.client import Client as NATS

from shared import config as cfg
from shared.connect import ConnectFailed, connect_once


class CommandError(Exception):
    """What went wrong, in one line for the operator."""


async def one_line(prog: str, run: Awaitable[int]) -> int:
    """A command's exit status: its own, or 2 with its CommandError as one line on stderr."""
    try:
        return await run
    except CommandError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


URL_FILE = "url"
ADMIN_SEED = "credentials/admin.nk"  # every admin command's; `first exporter` reads as ops


def embedded_url_file(config: cfg.Config) -> Path | None:
    store = config.nats.embedded_store_dir
    return Path(store) / URL_FILE if store else None


def target(config: cfg.Config, args: argparse.Namespace, role: str = "admin") -> tuple[str, str]:
    """``(url, credentials file)``; ConnectFailed says what to pass when nothing names a server.
    With the embedded server, the seed of ``role`` (admin, or ops for a read-only command)."""
    url = getattr(args, "nats", "") or config.nats.url
    credentials = getattr(args, "credentials", "") or config.nats.credentials
    if url:
        return url, credentials
    url_file = embedded_url_file(config)
    if url_file is None:
        raise ConnectFailed(
            "needs a NATS URL: pass --nats or set nats.url in the config (for the embedded server"
            " of 'first up', set nats.embedded_store_dir and this command finds it)"
        )
    try:
        url = url_file.read_text().strip()
    except OSError:
        raise ConnectFailed(
            f"no embedded NATS server has written {url_file}: start 'first up' with this config,"
            " or pass --nats"
        ) from None
    seed = ADMIN_SEED if role == "admin" else f"credentials/{role}.nk"
    return url, credentials or str(Path(config.nats.embedded_store_dir) / seed)


async def connect(config: cfg.Config, args: argparse.Namespace, name: str) -> tuple[NATS, str]:
    url, credentials = target(config, args)
    return await connect_once(url, name, credentials), url
