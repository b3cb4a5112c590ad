"""How each service runs as a process: connect, start, wait for SIGTERM or SIGINT, stop cleanly."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path

import structlog

from shared import config as cfg
from shared.connect import close, connect
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


def _providers(config: cfg.Config, config_path: str, nats_url: str) -> dict:
    from services.scaler.providers.local import LocalProvider

    providers = {}
    for cluster in config.clusters:
        if cluster.provider == "local":
            providers[cluster.name] = LocalProvider(
                str(Path(config_path).resolve()), nats_url, stop_timeout_s=config.worker.drain_timeout_s + 30
            )
    return providers


async def _serve_gateway(
    stack: contextlib.AsyncExitStack, config: cfg.Config, url: str, args, local_router=None
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
        runner = await start_site(create_app(config, url, local_router=local_router), host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    stack.push_async_callback(runner.cleanup)
    structlog.get_logger().info("gateway_listening", url=f"http://{host}:{port}")


async def up(config: cfg.Config, args: argparse.Namespace) -> int:
    """The whole stack in one process tree: NATS (embedded unless configured), gateway, router, scaler."""
    from services.router.service import Router
    from services.scaler.service import Scaler

    stop = _stop_event()
    async with contextlib.AsyncExitStack() as stack:
        url = config.nats.url
        if not url:
            server = EmbeddedNats(port=config.nats.embedded_port, store_dir=config.nats.embedded_store_dir)
            await stack.enter_async_context(server)
            url = server.url
        subjects = Subjects(config.nats.subject_prefix)
        router_nc = await connect(url, "first-router")
        stack.push_async_callback(close, router_nc)
        router = await stack.enter_async_context(Router(router_nc, subjects, config))
        # The gateway hands its requests to this router by a call: one NATS round trip less.
        await _serve_gateway(stack, config, url, args, local_router=router)
        # Entered last, so it stops first: no new nodes during shutdown, and the workers drain
        # while the gateway and router still carry their answers.
        scaler_nc = await connect(url, "first-scaler")
        stack.push_async_callback(close, scaler_nc)
        await stack.enter_async_context(
            Scaler(scaler_nc, subjects, config, _providers(config, args.config, url))
        )
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
    nc = await connect(url, name)
    try:
        async with make(nc, url):
            await stop.wait()
    finally:
        await close(nc)
    return 0


async def router(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.router.service import Router

    subjects = Subjects(config.nats.subject_prefix)
    return await _run_on_nats(config, args, "first-router", lambda nc, _url: Router(nc, subjects, config))


async def scaler(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.scaler.service import Scaler

    subjects = Subjects(config.nats.subject_prefix)
    return await _run_on_nats(
        config,
        args,
        "first-scaler",
        lambda nc, url: Scaler(nc, subjects, config, _providers(config, args.config, url)),
    )


async def worker(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.worker.engines import make_engine
    from services.worker.service import Worker

    url = _nats_url(config, args)
    model = config.model(args.model)
    if model is None:
        raise UsageError(f"model {args.model!r} is not in the config")
    if config.cluster(args.cluster) is None:
        raise UsageError(f"cluster {args.cluster!r} is not in the config")
    stop = _stop_event()
    nc = await connect(url, f"first-worker-{args.worker_id or args.cluster}")
    w = Worker(
        nc,
        Subjects(config.nats.subject_prefix),
        config.worker,
        model,
        args.cluster,
        make_engine(model),
        worker_id=args.worker_id,
        node_id=args.node_id,
    )
    try:
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
        await w.drain()  # SIGTERM: finish what we have, take nothing new
    finally:
        await w.stop()
        await close(nc)
    return 0


async def keys(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.admin import keys as admin_keys

    return await admin_keys.main(config, args)


async def usage(config: cfg.Config, args: argparse.Namespace) -> int:
    from services.admin import usage as admin_usage

    return await admin_usage.main(config, args)


COMMANDS: dict[str, Callable[[cfg.Config, argparse.Namespace], Coroutine]] = {
    "up": up,
    "gateway": gateway,
    "router": router,
    "scaler": scaler,
    "worker": worker,
    "keys": keys,
    "usage": usage,
}
