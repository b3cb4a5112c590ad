"""How each service runs as a process: connect, start, wait for SIGTERM or SIGINT, stop cleanly."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path

import structlog

from services.admin import target
from shared import config as cfg
from shared import natsauth
from shared.connect import ConnectFailed, close, connect
from shared.natsauth import Credentials
from shared.natsserver import EmbeddedNats
from shared.subjects import Subjects

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class UsageError(Exception):
    """The command line and the config do not fit together."""


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _nats_url(config: cfg.Config, args: argparse.Namespace) -> str:
    url = args.nats or config.nats.url
    if not url:
        raise UsageError("needs a NATS URL: pass --nats or set nats.url in the config (or use 'first up')")
    return url


def _credentials(config: cfg.Config, args: argparse.Namespace) -> str:
    return getattr(args, "credentials", "") or config.nats.credentials


def _providers(
    config: cfg.Config, config_path: str, nats_url: str, credentials_dir: str = "", *, detach: bool = True
) -> dict:
    """``detach``: local worker processes outlive their scaler (a successor adopts them); False
    where no successor could reach them (``first up``'s throwaway embedded NATS server)."""
    from services.scaler.providers.local import LocalProvider

    providers = {}
    for cluster in config.clusters:
        if cluster.provider == "local":
            providers[cluster.name] = LocalProvider(
                str(Path(config_path).resolve()),
                nats_url,
                stop_timeout_s=config.worker.drain_timeout_s + 30,
                credentials_dir=credentials_dir,
                detach=detach,
            )
        else:  # slurm, pbs, globus_compute: services/scaler/providers/factory.py
            from services.scaler.providers.factory import build_batch_or_globus

            providers[cluster.name] = build_batch_or_globus(
                cluster, config_path=config_path, nats_url=nats_url, credentials_dir=credentials_dir
            )
    return providers


async def _serve_gateway(
    stack: contextlib.AsyncExitStack, config: cfg.Config, url: str, args, local_router=None, seed: str = ""
) -> None:
    from services.gateway.app import create_app, start_site

    host = args.host or config.gateway.host
    port = config.gateway.port if args.port is None else args.port
    if "none" in config.auth.methods and host not in _LOOPBACK:
        raise UsageError(
            f'auth.methods = ["none"] lets anyone who reaches {host} call the API as anyone: an open'
            ' gateway listens on loopback only (set auth.methods to "keys" and/or "globus")'
        )
    try:
        credentials = seed or _credentials(config, args)
        app = create_app(config, url, local_router=local_router, credentials=credentials)
        runner = await start_site(app, host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    except cfg.ConfigError as exc:  # a setting only start-up can check (a secret file, say)
        raise UsageError(str(exc)) from None
    stack.push_async_callback(runner.cleanup)
    structlog.get_logger().info("gateway_listening", url=f"http://{host}:{port}")


async def _embedded_nats(stack: contextlib.AsyncExitStack, config: cfg.Config) -> tuple[str, Credentials]:
    """The embedded nats-server, with one nkey user per role (shared/natsauth.py): no connection
    without credentials, and each service only its own subjects. The seeds stay in the store
    directory (a temporary one unless nats.embedded_store_dir is set), so a restart keeps them."""
    store = config.nats.embedded_store_dir or stack.enter_context(
        tempfile.TemporaryDirectory(prefix="first-nats-")
    )
    role_list = natsauth.roles(config)
    by_name = {r.name: r for r in role_list}
    role_list.append(natsauth.combined("core", by_name["gateway"], by_name["router"]))
    credentials = natsauth.write_credentials(Path(store) / "credentials", role_list)
    conf = Path(store) / "nats-server.conf"
    host, port = config.nats.embedded_host, config.nats.embedded_port or -1
    conf.write_bytes(natsauth.server_config(credentials, host=host, port=port, store_dir=store))
    server = await stack.enter_async_context(
        EmbeddedNats(host=host, config_file=str(conf), users=credentials.public_keys())
    )
    # Where `first keys` and `first usage` on this config find the server (services/admin/target.py).
    url_file = Path(store) / target.URL_FILE
    url_file.write_text(server.url + "\n")
    stack.callback(url_file.unlink, missing_ok=True)
    structlog.get_logger().info("nats_credentials", directory=str(credentials.directory))
    return server.url, credentials


async def _ensure_streams(nc, config: cfg.Config) -> None:
    """The usage stream (shared/usage_stream.py) and the event stream (shared/events.py) exist with
    the config's limits, or we stop."""
    from shared import events, streams, usage_stream

    for what, module, settings in (("usage", usage_stream, config.usage), ("event", events, config.events)):
        try:
            info = await module.ensure(nc, config)
        except streams.StreamError as exc:
            raise UsageError(f"{what} stream: {exc}") from None
        structlog.get_logger().info(
            f"{what}_stream_ready", stream=info.config.name, retention_days=settings.retention_days
        )


async def up(config: cfg.Config, args: argparse.Namespace) -> int:
    """The whole stack in one process tree: NATS (embedded unless configured), gateway, router, scaler."""
    from services.batch.service import BatchService
    from services.router.service import Router
    from services.scaler.service import Scaler

    stop = _stop_event()
    async with contextlib.AsyncExitStack() as stack:
        url, credentials = config.nats.url, None
        if not url:
            url, credentials = await _embedded_nats(stack, config)

        def seed(role: str) -> str:
            return str(credentials.seed_file(role)) if credentials else config.nats.credentials

        subjects = Subjects(config.nats.subject_prefix)
        # The gateway and the router share this process and its connection.
        core_nc = await connect(url, "first-core", seed("core"))
        stack.push_async_callback(close, core_nc)
        await _ensure_streams(core_nc, config)
        router = await stack.enter_async_context(Router(core_nc, subjects, config))
        # The gateway hands its requests to this router by a call: one NATS round trip less.
        # The core seed: the gateway's own connection to the service API (services/gateway/discovery.py).
        await _serve_gateway(stack, config, url, args, local_router=router, seed=seed("core"))
        if config.metrics.exporter_port:  # before the scaler, so it sees the first node events
            host, port = config.metrics.exporter_host, config.metrics.exporter_port
            await _start_exporter(stack, config, url, seed("ops"), host, port)
        # Entered last, so it stops first: no new nodes during shutdown, and the workers drain
        # while the gateway and router still carry their answers.
        scaler_nc = await connect(url, "first-scaler", seed("scaler"))
        stack.push_async_callback(close, scaler_nc)
        workers_dir = str(credentials.directory) if credentials else config.nats.worker_credentials_dir
        # Its workers outlive a killed `first up` only where a restarted one finds them again: the
        # same NATS server (configured, or embedded with a store and a port of its own).
        lasting = bool(config.nats.url or (config.nats.embedded_store_dir and config.nats.embedded_port))
        providers = _providers(config, args.config, url, workers_dir, detach=lasting)
        await stack.enter_async_context(Scaler(scaler_nc, subjects, config, providers))
        # Batch mode (docs/batch.md); it stops first, handing its lines on their way back to the
        # queue while the rest still runs. Its lines go to the router by a call, as the gateway's.
        batch_nc = await connect(url, "first-batch", seed("batch"))
        stack.push_async_callback(close, batch_nc)
        await stack.enter_async_context(BatchService(batch_nc, subjects, config, local_router=router))
        await stop.wait()
        structlog.get_logger().info("stack_stopping")
    return 0


async def gateway(config: cfg.Config, args: argparse.Namespace) -> int:
    url = _nats_url(config, args)
    stop = _stop_event()
    async with contextlib.AsyncExitStack() as stack:
        await _serve_gateway(stack, config, url, args)
        await stop.wait()
    return 0


async def _run_on_nats(config: cfg.Config, args: argparse.Namespace, name: str, make) -> int:
    """Connect, run the service that ``make(nc)`` builds until SIGTERM or SIGINT, then stop it."""
    url = _nats_url(config, args)
    stop = _stop_event()
    nc = await connect(url, name, _credentials(config, args))
    try:
        async with make(nc, url):
            await stop.wait()
    finally:
        await close(nc)
    return 0


async def router(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.router.service import Router

    subjects = Subjects(config.nats.subject_prefix)

    @contextlib.asynccontextmanager
    async def started(nc, _url):
        # Every deployment runs a router: each one makes sure the streams are there.
        await _ensure_streams(nc, config)
        async with Router(nc, subjects, config) as r:
            yield r

    return await _run_on_nats(config, args, "first-router", started)


async def scaler(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.scaler.service import Scaler

    subjects = Subjects(config.nats.subject_prefix)
    return await _run_on_nats(
        config,
        args,
        "first-scaler",
        # A `first scaler` that stops leaves its nodes serving, in its node table: the next scaler
        # (a standby, or this one restarted) adopts them. `first up` stops them with the stack.
        lambda nc, url: Scaler(
            nc,
            subjects,
            config,
            _providers(config, args.config, url, config.nats.worker_credentials_dir),
            release_on_stop=False,
        ),
    )


EXPORTER_PORT = 9464  # Prometheus's port allocation for exporters: the default of `first exporter`


async def _start_exporter(
    stack: contextlib.AsyncExitStack, config: cfg.Config, url: str, credentials: str, host: str, port: int
) -> None:
    """The exporter (services/exporter) on a connection of its own, as the read-only ops user."""
    from services.exporter.service import Exporter

    nc = await connect(url, "first-exporter", credentials)
    stack.push_async_callback(close, nc)
    subjects = Subjects(config.nats.subject_prefix)
    try:
        await stack.enter_async_context(Exporter(nc, subjects, config, host, port))
    except OSError as exc:
        raise UsageError(f"the exporter cannot listen on {host}:{port}: {exc.strerror}") from None


async def exporter(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.admin.target import target

    try:  # as the admin commands do, it finds `first up`'s embedded server, and reads as ops
        url, credentials = target(config, args, role="ops")
    except ConnectFailed as exc:
        raise UsageError(str(exc)) from None
    host = args.host or config.metrics.exporter_host
    port = args.port if args.port is not None else config.metrics.exporter_port or EXPORTER_PORT
    stop = _stop_event()
    async with contextlib.AsyncExitStack() as stack:
        await _start_exporter(stack, config, url, credentials, host, port)
        await stop.wait()
    return 0


async def worker(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.worker.control import Control, drain_at
    from services.worker.engines import make_engine
    from services.worker.service import Worker

    url = _nats_url(config, args)
    model = config.model(args.model)
    if model is None:
        raise UsageError(f"model {args.model!r} is not in the config")
    if config.cluster(args.cluster) is None:
        raise UsageError(f"cluster {args.cluster!r} is not in the config")
    if args.walltime is not None and not 0 < args.walltime < 1e8:
        raise UsageError(f"--walltime must be a positive number of seconds, not {args.walltime:g}")
    stop = _stop_event()
    nc = await connect(url, f"first-worker-{args.worker_id or args.cluster}", _credentials(config, args))
    w = Worker(
        nc,
        Subjects(config.nats.subject_prefix),
        config.worker,
        model,
        args.cluster,
        make_engine(model),
        worker_id=args.worker_id,
        node_id=args.node_id,
        drain_at=drain_at(args.walltime, config.worker.walltime_margin_s, started=time.time()),
    )
    # The scaler's drain or stop on the worker's control subject, or its walltime, ends it as
    # SIGTERM does (services/worker/control.py).
    control = Control(nc, w.subjects, w.worker_id, lambda _action, _why: stop.set(), drain_at=w.drain_at)
    try:
        await control.start()
        starting = asyncio.create_task(w.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # asked to stop while the engine loads
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return 0
        if starting.exception() is not None:
            return 1
        await stop.wait()
        if control.action != "stop":
            await w.drain()  # SIGTERM: finish what we have, take nothing new
    finally:
        await control.stop()
        await w.stop()
        await close(nc)
    return 0


async def keys(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.admin import keys as admin_keys

    return await admin_keys.main(config, args)


async def cluster(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.admin import clusters as admin_clusters

    return await admin_clusters.main(config, args)


async def status(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.admin import status as admin_status

    return await admin_status.main(config, args)


async def services(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.admin import services as admin_services

    return await admin_services.main(config, args)


async def batch(config: cfg.Config, args: argparse.Namespace) -> int:
    """``first batch serve`` runs the batch service; the other actions are admin commands."""
    if args.action != "serve":
        from services.admin import batch as admin_batch

        return await admin_batch.main(config, args)
    from services.batch.service import BatchService

    subjects = Subjects(config.nats.subject_prefix)
    return await _run_on_nats(
        config, args, "first-batch", lambda nc, _url: BatchService(nc, subjects, config)
    )


async def events(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.admin import events as admin_events

    return await admin_events.main(config, args)


async def usage(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.admin import usage as admin_usage

    return await admin_usage.main(config, args)


async def nats_auth(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.admin import nats_auth as admin_nats_auth

    return await admin_nats_auth.main(config, args)


COMMANDS: dict[str, Callable[[cfg.Config, argparse.Namespace], Coroutine]] = {
    "up": up,
    "gateway": gateway,
    "router": router,
    "scaler": scaler,
    "worker": worker,
    "keys": keys,
    "cluster": cluster,
    "usage": usage,
    "events": events,
    "batch": batch,
    "exporter": exporter,
    "status": status,
    "services": services,
    "nats-auth": nats_auth,
}
