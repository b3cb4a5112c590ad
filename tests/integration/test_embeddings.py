"""POST /v1/embeddings through a real gateway, router and worker, with the official openai SDK: the
simulator's vectors, and an OpenAI-compatible engine's (tests/mock_engine.py, which answers as vLLM
does, or, asked to, as llama.cpp's server does without pooling: a vector per token)."""

from __future__ import annotations

import base64
import math
from array import array

import openai
import pytest

from services.gateway.app import create_app
from tests.integration.conftest import make_config, openai_engine
from tests.mock_engine import MockEngine


@pytest.fixture
async def oai(services, subjects):
    async with MockEngine() as mock:
        config = make_config(
            [
                {"id": "sim-embed", "engine": {"kind": "sim", "ttft_ms": 0, "embedding_dims": 32}},
                {"id": "served", "engine": openai_engine(mock.url)},
            ],
            nats={"subject_prefix": subjects.prefix},
        )
        await services.router(config)
        await services.worker(config, "sim-embed")
        await services.worker(config, "served")
        url = await services.gateway(create_app(config, services.nats_url))
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        client.mock = mock
        yield client
        await client.close()


async def test_one_string_gets_one_unit_vector_and_its_usage(oai):
    reply = await oai.embeddings.create(model="sim-embed", input="the cluster wakes up")
    assert reply.object == "list" and reply.model == "sim-embed" and len(reply.data) == 1
    vector = reply.data[0].embedding
    assert len(vector) == 32 and math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5)
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (4, 4)


async def test_a_list_keeps_its_order_and_the_same_text_gives_the_same_vector(oai):
    reply = await oai.embeddings.create(model="sim-embed", input=["a b", "c", "a b"])
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert reply.data[0].embedding == reply.data[2].embedding != reply.data[1].embedding
    assert reply.usage.prompt_tokens == 5


async def test_base64_is_the_float32_bytes_of_the_same_vector(oai):
    floats = await oai.embeddings.create(model="sim-embed", input="x y")
    # The SDK decodes base64 itself unless asked for the raw answer.
    raw = await oai.embeddings.with_raw_response.create(
        model="sim-embed", input="x y", encoding_format="base64"
    )
    encoded = raw.http_response.json()["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert array("f", base64.b64decode(encoded)).tolist() == floats.data[0].embedding


async def test_token_ids_and_dimensions(oai):
    reply = await oai.embeddings.create(model="sim-embed", input=[[1, 2, 3], [4]], dimensions=8)
    assert [len(d.embedding) for d in reply.data] == [8, 8]


async def test_an_openai_compatible_engine_passes_its_vectors_through(oai):
    reply = await oai.embeddings.create(model="served", input=["one two three", "four"])
    assert [d.embedding for d in reply.data] == [[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    assert reply.usage.prompt_tokens == 4
    assert oai.mock.received[-1]["model"] == "mock" and oai.mock.received[-1]["encoding_format"] == "float"


async def test_per_token_vectors_are_mean_pooled_and_normalized(oai):
    reply = await oai.embeddings.create(model="served", input="a b c", extra_body={"mock_per_token": True})
    mean = [1.0, 1.0, 0.0, 0.0]  # positions 0, 1, 2 average to 1; the second column is all 1
    norm = math.sqrt(2)
    assert reply.data[0].embedding == pytest.approx([x / norm for x in mean], rel=1e-6)


@pytest.mark.parametrize(
    "bad",
    [{"input": ""}, {"input": []}, {"input": [""]}, {"input": [1, "a"]}, {"input": [[]]}, {"input": {"a": 1}},
     {"input": "x", "encoding_format": "hex"}, {"input": ["x"] * 2049}],
)  # fmt: skip
async def test_bad_input_is_a_400_naming_the_field(oai, bad):
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.embeddings.create(model="sim-embed", **bad)
    assert caught.value.status_code == 400 and caught.value.body["param"] in ("input", "encoding_format")


async def test_an_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError):
        await oai.embeddings.create(model="nope", input="x")
