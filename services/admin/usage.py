"""``first usage``: requests and tokens from the usage stream (a stub until the stream lands)."""

from __future__ import annotations

import argparse

from shared import config as cfg


async def main(config: cfg.Config, args: argparse.Namespace) -> int:
    print("first usage: not available yet")
    return 2
