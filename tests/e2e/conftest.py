"""``first up`` with a simulated federation, as a child process on the session's nats-server.

The models are chosen so each end-to-end test has one to itself where it disturbs workers.
"""

from __future__ import annotations

import uuid

import nats
import openai
import pytest

from shared.client import FirstClient
from shared.subjects import Subjects
from tests.support import Stack

SIM_STACK = """
[nats]
url = "{url}"
subject_prefix = "{prefix}"

[gateway]
max_body_bytes = 2097152
request_timeout_s = 30
stall_timeout_s = 2
sse_keepalive_s = 0.5

[router]
queue_timeout_s = 20
retry_after_s = 3

[scaler]
tick_s = 0.2

[worker]
heartbeat_s = 0.25

[[clusters]]
name = "polaris"

[[clusters]]
name = "sophia"

[[models]]
id = "sim/hot"
capacity = 4
engine = {{ kind = "sim", ttft_ms = 5, itl_ms = 2 }}
scaling = {{ min_hot = 1, max_workers = 2 }}

[[models]]
id = "sim/cold"
clusters = ["sophia"]
engine = {{ kind = "sim", ttft_ms = 5, itl_ms = 2, load_s = 0.3 }}
scaling = {{ min_hot = 0, max_workers = 1 }}

[[models]]
id = "sim/slow"
capacity = 1
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 500, default_max_tokens = 30 }}
scaling = {{ min_hot = 1, max_workers = 1 }}

[[models]]
id = "sim/stall"
engine = {{ kind = "sim", ttft_ms = 600000 }}
scaling = {{ min_hot = 1, max_workers = 1 }}

[[models]]
id = "sim/stuck"
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 600000, default_max_tokens = 5 }}
scaling = {{ min_hot = 0, max_workers = 1 }}

[[models]]
id = "sim/never"
queue_timeout_s = 1
engine = {{ kind = "sim", load_s = 3600 }}
scaling = {{ min_hot = 0, max_workers = 1 }}

[[models]]
id = "sim/brief"
clusters = ["polaris"]
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 1 }}
scaling = {{ min_hot = 0, max_workers = 1, idle_s = 1 }}

[[models]]
id = "sim/burst"
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 1, load_s = 1.5 }}
scaling = {{ min_hot = 0, max_workers = 3 }}

[[models]]
id = "sim/evented"
clusters = ["sophia"]
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 1, load_s = 0.3 }}
scaling = {{ min_hot = 0, max_workers = 1 }}

[[models]]
id = "sim/pair"
capacity = 2
engine = {{ kind = "sim", ttft_ms = 1, itl_ms = 40 }}
scaling = {{ min_hot = 2, max_workers = 2 }}
"""

HOT_MODELS = ["sim/hot", "sim/slow", "sim/stall", "sim/pair"]


@pytest.fixture(scope="session")
async def sim_stack(nats_url, tmp_path_factory):
    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    stack = Stack(SIM_STACK.format(url=nats_url, prefix=prefix), tmp_path_factory.mktemp("sim"), name="sim")
    stack.subjects = Subjects(prefix)
    await stack.start(ready_models=HOT_MODELS)
    yield stack
    code = await stack.stop()
    assert code == 0, f"first up exited with {code} on SIGINT:\n{stack.log_tail()}"


@pytest.fixture
async def oai(sim_stack):
    client = openai.AsyncOpenAI(
        base_url=sim_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=30
    )
    yield client
    await client.close()


@pytest.fixture
async def first_client(sim_stack, nats_url):
    """The NATS-native client on the stack's subjects: shows which worker served a request."""
    nc = await nats.connect(nats_url)
    async with FirstClient(nc, sim_stack.subjects, request_timeout_s=30) as client:
        yield client
    await nc.close()
