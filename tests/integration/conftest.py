"""Services in this process against the session's real nats-server: routers, workers, the NATS client."""

from __future__ import annotations

import contextlib

import msgspec
import nats
import pytest
from aiohttp import web

from services.gateway import keys
from services.gateway.app import start_site
from services.gateway.auth import auth_ctx
from services.router.service import Router
from services.worker.engines import make_engine
from services.worker.service import Worker
from shared import config as cfg
from shared import errors, schema
from shared.client import FirstClient


def openai_engine(url: str, served_model: str = "mock", **fields) -> dict:
    """The config of an ``openai`` engine: a server already running at ``url`` (a test double)."""
    return {"kind": "openai", "url": url, "served_model": served_model, "health_path": "/health", **fields}


def make_config(models: list[dict], **sections) -> cfg.Config:
    """A config as a user would write it: two clusters, the given models (sim engines by default)."""
    for m in models:
        m.setdefault("engine", {"kind": "sim", "ttft_ms": 1, "itl_ms": 1})
    raw = {"clusters": [{"name": "a"}, {"name": "b"}], "models": models, **sections}
    raw.setdefault("worker", {"heartbeat_s": 0.2})
    config = msgspec.convert(raw, cfg.Config)
    cfg.validate(config)
    return config


class TableAuth:
    """Test only, in place of the configured authenticators: ``Bearer <name>`` is the identity of
    that name in the table (the real middleware, access checks and limits run as usual)."""

    name = "test"

    def __init__(self, identities: dict[str, schema.Identity]):
        self.identities = identities

    def claims(self, credential: str) -> bool:
        return True

    async def identify(self, credential: str) -> schema.Identity:
        if credential not in self.identities:
            raise errors.Unauthorized("not in the test's table")
        return self.identities[credential]

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def table_auth(app: web.Application, identities: dict[str, schema.Identity]) -> None:
    """Make ``app`` (from ``create_app``) take the table's identities instead of its config's methods."""

    async def table_auth_ctx(app):
        app[keys.AUTHENTICATORS] = [TableAuth(identities)]
        yield

    app.cleanup_ctx[list(app.cleanup_ctx).index(auth_ctx)] = table_auth_ctx


class Services:
    """Starts routers and workers on demand; stops all of them at the end of the test."""

    def __init__(self, nats_url, subjects, stack: contextlib.AsyncExitStack):
        self.nats_url, self.subjects, self.stack = nats_url, subjects, stack

    async def connect(self):
        nc = await nats.connect(self.nats_url)
        self.stack.push_async_callback(nc.close)
        return nc

    async def router(self, config: cfg.Config) -> Router:
        router = Router(await self.connect(), self.subjects, config)
        await self.stack.enter_async_context(router)
        return router

    async def worker(self, config: cfg.Config, model: str, cluster: str = "a", **kw) -> Worker:
        """A worker with the engine its model's config names, as ``first worker`` builds it."""
        model_cfg = config.model(model)
        engine = make_engine(model_cfg)
        worker = Worker(await self.connect(), self.subjects, config.worker, model_cfg, cluster, engine, **kw)
        await self.stack.enter_async_context(worker)
        return worker

    async def client(self, **kw) -> FirstClient:
        client = FirstClient(await self.connect(), self.subjects, **kw)
        await self.stack.enter_async_context(client)
        return client

    async def gateway(self, app: web.Application) -> str:
        """``app`` (from ``create_app``) served on a free loopback port; its base URL."""
        runner = await start_site(app, "127.0.0.1", 0)
        self.stack.push_async_callback(runner.cleanup)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def services(nats_url, subjects):
    async with contextlib.AsyncExitStack() as stack:
        yield Services(nats_url, subjects, stack)
