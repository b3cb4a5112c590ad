"""One real nats-server for the whole session; each test gets its own subject prefix and connection."""

from __future__ import annotations

import uuid

import nats
import pytest

from shared.natsserver import EmbeddedNats
from shared.subjects import Subjects


@pytest.fixture(scope="session")
async def nats_url():
    async with EmbeddedNats() as server:
        yield server.url


@pytest.fixture
def subjects() -> Subjects:
    """A prefix of its own: tests share the server but never see each other's messages."""
    return Subjects(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def nc(nats_url):
    conn = await nats.connect(nats_url, name="test")
    yield conn
    await conn.drain()
