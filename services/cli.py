"""The `first` command: `first up` runs the whole stack; `first gateway|router|scaler|worker`, one service.

Each entry point only loads config, configures logging and runs the service (services/run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys

from shared.config import ConfigError, load_config
from shared.logging import configure_logging

DEFAULT_CONFIG = "compose/first.local.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="first", description="FIRST on NATS: OpenAI-compatible inference for HPC"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "--config", default=DEFAULT_CONFIG, help=f"TOML config file (default: {DEFAULT_CONFIG})"
        )
        p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None,
                       help="JSON log lines (default: when stderr is not a terminal)")  # fmt: skip
        if name != "up":
            p.add_argument("--nats", default="", help="NATS URL (default: nats.url from the config)")
        return p

    for name, help_ in (
        ("up", "run the whole stack: embedded NATS (unless nats.url is set), gateway, router, scaler"),
        ("gateway", "run the OpenAI-compatible HTTP gateway"),
    ):
        p = add(name, help_)
        p.add_argument("--host", default=None, help="bind address (default: gateway.host, 127.0.0.1)")
        p.add_argument("--port", type=int, default=None, help="port (default: gateway.port, 8000)")
    add("router", "run a router (several may run side by side)")
    add("scaler", "run the scaler with the config's node providers")
    p = add("worker", "run a worker beside its engine on this node")
    p.add_argument("--cluster", required=True, help="the cluster this node belongs to")
    p.add_argument("--model", required=True, help="the model id to serve (from the config)")
    p.add_argument("--worker-id", default="", help="default: <cluster>-<model>-<random>")
    p.add_argument("--node-id", default="", help="the node id a scaler gave this node")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, service=args.command, json=args.log_json)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"first: {exc}", file=sys.stderr)
        return 2
    from services import run

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # not on Linux
        runner = asyncio.run
    # Requests make many short-lived objects and hardly any cycles: leave the objects of start-up
    # out of collections, and collect the youngest generation less often (a few % of CPU).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        return runner(run.COMMANDS[args.command](config, args))
    except run.UsageError as exc:
        print(f"first {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
