"""``first keys create|list|revoke``: API keys in JetStream KV (a stub until the key store lands)."""

from __future__ import annotations

import argparse

from shared import config as cfg


async def main(config: cfg.Config, args: argparse.Namespace) -> int:
    print("first keys: not available yet")
    return 2
