"""Fault tests: real nats-server, real ``first`` processes, killed, stopped and restarted on purpose.

Each test gets a ``fleet`` (tests/processes.py) on a subject prefix of its own, on the session's
nats-server, or with ``own_fleet`` on a server of its own that it may restart
(``restartable_nats``). Every process a fleet started is killed at the end, and a failed test's
report carries every process's log tail.
"""

from __future__ import annotations

import contextlib
import uuid

import pytest

from shared.natsserver import EmbeddedNats
from tests.processes import Fleet
from tests.support import free_port

_FLEET = pytest.StashKey[Fleet]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    fleet = item.stash.get(_FLEET, None)
    if fleet is not None and report.failed:
        report.sections.append(("first processes (log tails)", fleet.report()))
    return report


@contextlib.asynccontextmanager
async def _running_fleet(request, tmp_path, nats_url: str):
    fleet = Fleet(tmp_path, nats_url, f"f{uuid.uuid4().hex[:10]}")
    request.node.stash[_FLEET] = fleet
    try:
        yield await fleet.start()
    finally:
        await fleet.close()


@pytest.fixture
async def fleet(request, nats_url, tmp_path):
    async with _running_fleet(request, tmp_path, nats_url) as fleet:
        yield fleet


class RestartableNats:
    """A nats-server on a fixed port and store dir, so a restarted one is the same server to its
    clients (they reconnect to the URL they know)."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.store = str(tmp_path / "jetstream")
        self.server: EmbeddedNats | None = None
        self.url = ""

    async def start(self) -> str:
        self.server = EmbeddedNats(port=self.port, store_dir=self.store)
        self.url = await self.server.start()
        return self.url

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.stop()


@pytest.fixture
async def restartable_nats(tmp_path):
    server = RestartableNats(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def own_fleet(request, restartable_nats, tmp_path):
    async with _running_fleet(request, tmp_path, restartable_nats.url) as fleet:
        yield fleet
