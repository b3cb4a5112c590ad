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

    def common(p: argparse.ArgumentParser, *, nats: bool = True) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", default=DEFAULT_CONFIG, help=f"TOML config file (default: {DEFAULT_CONFIG})"
        )
        p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None,
                       help="JSON log lines (default: when stderr is not a terminal)")  # fmt: skip
        if nats:
            p.add_argument("--nats", default="", help="NATS URL (default: nats.url from the config)")
            p.add_argument("--credentials", default="",
                           help="NATS credentials: an nkey seed or .creds file (default: nats.credentials)")  # fmt: skip
        return p

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return common(sub.add_parser(name, help=help_, description=help_), nats=name != "up")

    for name, help_ in (
        ("up", "run the whole stack: embedded NATS (unless nats.url is set), gateway, router, scaler"),
        ("gateway", "run the OpenAI-compatible HTTP gateway"),
    ):
        p = add(name, help_)
        p.add_argument("--host", default=None, help="bind address (default: gateway.host, 127.0.0.1)")
        p.add_argument("--port", type=int, default=None, help="port (default: gateway.port, 8000)")
    add("router", "run a router (several may run side by side)")
    add("scaler", "run the scaler with the config's node providers")
    p = add("exporter", "serve Prometheus metrics of the whole federation, read from NATS (docs/metrics.md)")
    p.add_argument("--host", default=None, help="bind address (default: metrics.exporter_host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: metrics.exporter_port, else 9464)")  # fmt: skip
    p = add("worker", "run a worker beside its engine on this node")
    p.add_argument("--cluster", required=True, help="the cluster this node belongs to")
    p.add_argument("--model", required=True, help="the model id to serve (from the config)")
    p.add_argument("--worker-id", default="", help="default: <cluster>-<model>-<random>")
    p.add_argument("--node-id", default="", help="the node id a scaler gave this node")
    p.add_argument("--walltime", type=float, default=None, metavar="SECONDS",
                   help="the batch job's time limit: drain worker.walltime_margin_s before it ends")  # fmt: skip

    help_ = "API keys: create one (printed once), list them, revoke one"
    keys = sub.add_parser("keys", help=help_, description=help_).add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = common(keys.add_parser("create", help="create a key; it is printed once and kept only hashed"))
    create.add_argument("name", help="who or what the key is for (its identity's user name)")
    create.add_argument("--groups", default="", help="comma-separated groups the key's identity is in")
    create.add_argument("--expires", default="", help="lifetime, e.g. 30d, 12h (default: never)")
    listing = common(keys.add_parser("list", help="every key: id, name, groups, created, expires, state"))
    listing.add_argument("--json", action="store_true", help="one JSON object per key")
    revoke = common(keys.add_parser("revoke", help="revoke a key at once, on every gateway"))
    revoke.add_argument("key", help="the key's id, or its name")

    help_ = "clusters: list them with their maintenance state; put one under maintenance or back"
    clusters = sub.add_parser("cluster", help=help_, description=help_).add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    listing = common(clusters.add_parser("list", help="every cluster: in service or under maintenance"))
    listing.add_argument("--json", action="store_true", help="one JSON object per cluster")
    maintenance = common(clusters.add_parser("maintenance", help="put a cluster under maintenance, or back"))
    maintenance.add_argument("name", help="the cluster's name in the config")
    maintenance.add_argument("state", choices=["on", "off"])
    maintenance.add_argument("--message", default="", help="what callers pinned to it are told (with 503)")

    help_ = "write NATS users and permissions (nkey seeds and a nats-server.conf) for a site's servers"
    p = common(sub.add_parser("nats-auth", help=help_, description=help_), nats=False)
    p.add_argument("--out", required=True, help="directory for credentials/ and nats-server.conf")
    p.add_argument(
        "--host", default="127.0.0.1", help="the address nats-server listens on (default: loopback)"
    )
    p.add_argument("--port", type=int, default=4222, help="its client port (default: 4222)")
    p.add_argument("--store-dir", default="", help="its JetStream store (default: OUT/jetstream)")
    p.add_argument("--leaf-port", type=int, default=0,
                   help="make it a hub that accepts leaf nodes on this port (7422), and write"
                        " OUT/leaf-<cluster>.conf for each cluster (docs/federation.md)")  # fmt: skip
    p.add_argument("--hub-url", action="append", default=[],
                   help="a hub leaf node URL for the leaf configs, nats-leaf://host:7422; once per hub"
                        " server (default: nats-leaf://HOST:LEAF_PORT)")  # fmt: skip
    p.add_argument("--leaf-host", default="0.0.0.0",
                   help="where each leaf node listens for its workers (default: 0.0.0.0)")  # fmt: skip
    p.add_argument("--leaf-client-port", type=int, default=4222,
                   help="the leaf nodes' client port, for workers (default: 4222)")  # fmt: skip

    p = add("status", "models and clusters as the routers see them: workers, slots, queues, maintenance")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object (per refresh)")

    p = add("services", "what answers NATS's service API (nats micro ls): each service, its ids and counters")
    p.add_argument("--json", action="store_true", help="one JSON array: each service's INFO and STATS")

    help_ = "operator events: node, worker, scale, request, limit, batch, config"
    events = sub.add_parser("events", help=help_, description=help_).add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    tail = common(events.add_parser("tail", help="the events since a time, then live as they come"))
    tail.add_argument("--since", default="10m", help="how far back, e.g. 10m, 2h, or a date (default: 10m)")
    tail.add_argument("--kind", default="", help="only these kinds, comma-separated: node,worker")
    tail.add_argument("--cluster", default="", help="only this cluster's events")
    tail.add_argument("--json", action="store_true", help="one JSON object per event")
    tail.add_argument("--no-follow", action="store_true", help="stop after the stored events")
    tail.add_argument("--no-color", action="store_true", help="no colours, even on a terminal")

    help_ = (
        "batch mode (docs/batch.md): run the batch service; submit a JSONL file, follow it, fetch its results"
    )
    batch = sub.add_parser("batch", help=help_, description=help_).add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    common(batch.add_parser("serve", help="run the batch service (first up runs one)"))
    submit = common(batch.add_parser("submit", help="upload a JSONL file of requests and start a batch"))
    submit.add_argument("file", help="OpenAI batch lines: custom_id, method, url, body")
    submit.add_argument("--model", default="", help="run every line on this model (default: each line's)")
    submit.add_argument("--endpoint", default="/v1/chat/completions", help="the lines' url")
    submit.add_argument("--user", default="anonymous", help="whose batch it is (default: anonymous)")
    submit.add_argument("--wait", action="store_true", help="follow it, as status does, until it ends")
    status_p = common(batch.add_parser("status", help="one batch with a progress bar, or every batch"))
    status_p.add_argument("id", nargs="?", default="", help="the batch id (default: list every batch)")
    status_p.add_argument("--watch", action="store_true", help="refresh until the batch ends")
    status_p.add_argument("--json", action="store_true", help="JSON instead of text")
    results = common(batch.add_parser("results", help="write a batch's output (or error) file"))
    results.add_argument("id", help="the batch id")
    results.add_argument("-o", "--output", default="-", help="where to write it (default: stdout)")
    results.add_argument("--errors", action="store_true", help="the error file instead")

    p = add("usage", "requests and tokens per user, model or cluster, from the usage records")
    p.add_argument("--since", default="7d", help="how far back, e.g. 7d, 12h (default: 7d)")
    p.add_argument(
        "--by", choices=["user", "model", "cluster"], default=None, help="one row per (default: user)"
    )
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON instead of a table")
    output.add_argument(
        "--csv", action="store_true", help="CSV: the table's rows with --by, else every record (accounting)"
    )
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
    except KeyboardInterrupt:  # Ctrl-C ends a watch or a tail: no traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
