"""POST /v1/embeddings with the real MiniLM model, through the OpenAI SDK."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from models.classical.embedding import resolve_dtype
from tests.integration.conftest import MODELS, VLLM_MODEL, Gateway

SENTENCES = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Quarterly revenue grew by eight percent.",
    "How do I reset my password?",
]


@pytest.fixture(scope="module")
def minilm() -> Any:
    """The same model, run in this process."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MODELS / "all-minilm-l6-v2"), device="cpu", local_files_only=True)


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_langchain_openai_embeddings_with_the_settings_readme_gives(gateway: Gateway, minilm: Any) -> None:
    from langchain_openai import OpenAIEmbeddings

    # Text, not tiktoken's ids (which mean nothing to MiniLM), in requests within max_instances_per_request.
    embeddings = OpenAIEmbeddings(
        model="minilm", base_url=gateway.v1, api_key="unused", check_embedding_ctx_length=False,
        chunk_size=3, max_retries=0, timeout=60,
    )
    vectors = [*embeddings.embed_documents(SENTENCES), embeddings.embed_query(SENTENCES[0])]
    expected = [*minilm.encode(SENTENCES), minilm.encode(SENTENCES[0])]
    assert len(vectors) == len(expected)
    for got, want in zip(vectors, expected):
        assert cosine(got, want) >= 0.999


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_embeddings_equal_the_model_run_in_process(
    http: httpx.Client, minilm: Any, encoding_format: str
) -> None:
    response = http.post(
        "/v1/embeddings", json={"model": "minilm", "input": SENTENCES, "encoding_format": encoding_format}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    vectors = [
        np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") if encoding_format == "base64" else item["embedding"]
        for item in body["data"]
    ]
    assert [item["index"] for item in body["data"]] == [0, 1, 2, 3]
    expected = minilm.encode(SENTENCES)
    for got, want in zip(vectors, expected):
        assert len(got) == 384
        assert cosine(got, want) >= 0.999
    tokens = sum(len(ids) for ids in minilm.tokenizer(SENTENCES)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_openai_sdk_default_base64_decodes_to_the_same_vectors(client: openai.OpenAI, minilm: Any) -> None:
    response = client.embeddings.create(model="embed", input=SENTENCES[0])  # the SDK asks for base64
    assert response.model == "minilm"
    assert len(response.data) == 1 and len(response.data[0].embedding) == 384
    assert cosine(response.data[0].embedding, minilm.encode(SENTENCES[0])) >= 0.999


def test_related_sentences_score_closer_than_unrelated(client: openai.OpenAI) -> None:
    vectors = [d.embedding for d in client.embeddings.create(model="minilm", input=SENTENCES).data]
    related = cosine(vectors[0], vectors[1])
    assert related > cosine(vectors[0], vectors[2]) + 0.3
    assert related > cosine(vectors[0], vectors[3]) + 0.3


async def test_concurrent_requests_share_batches(gateway: Gateway) -> None:
    before = await asyncio.to_thread(gateway.call, "minilm", "stats")
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:
        responses = await asyncio.gather(
            *(session.post("/v1/embeddings", json={"model": "minilm", "input": f"sentence {i}"}) for i in range(32))
        )
    assert [r.status_code for r in responses] == [200] * 32
    after = await asyncio.to_thread(gateway.call, "minilm", "stats")
    new_batches = Counter(after["batch_sizes"]) - Counter(before["batch_sizes"])
    assert max(new_batches) > 1, new_batches
    # The ingress replicas gathered requests that arrived together into shared calls.
    assert after["requests"] - before["requests"] == 32
    assert after["calls"] - before["calls"] < 32, (before, after)
    assert after["dtype"] == resolve_dtype("auto", "cpu")  # what `auto` means on this machine


@pytest.mark.parametrize(
    ("body", "message", "param", "code"),
    [
        ({"input": ""}, "'input' is an empty string", "input", None),
        ({"input": ["ok", ""]}, "'input[1]' is an empty string", "input[1]", None),
        (
            {"input": []},
            "Invalid 'input': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            "input",
            "empty_array",
        ),
        ({"input": [[101, 2023]]}, "'input[0]': token-id input is not supported; send text", "input[0]", None),
        ({"input": ["ok", 3.5]}, "'input[1]' must be a string, not float", "input[1]", None),
        ({"input": ["x"] * 65}, "'input' holds 65 entries; this model accepts at most 64 per request.", "input", None),
        (
            {"input": ["short", "word, " * 200]},
            "input[1] has 402 tokens; this model's maximum context length is 256 tokens. Please shorten the input.",
            "input[1]",
            "context_length_exceeded",
        ),
        (  # refused before it is tokenized
            {"input": ["short", "word " * 300]},
            "input[1] has 300 words, each at least one token; this model's maximum context length is 256 tokens. "
            "Please shorten the input.",
            "input[1]",
            "context_length_exceeded",
        ),
        (
            {"input": "hi", "dimensions": 128},
            "This model makes 384-dimensional embeddings and cannot shorten them: leave out 'dimensions' or set it to 384.",
            "dimensions",
            None,
        ),
        (
            {"input": "hi", "encoding_format": "int8"},
            "Invalid value for 'encoding_format': 'int8'. Supported values are: 'float', 'base64'.",
            "encoding_format",
            "invalid_value",
        ),
        ({"input": "hi", "stream": True}, "Unrecognized request argument supplied: stream", "stream", None),
        ({}, "Missing required parameter: 'input'.", "input", "missing_required_parameter"),
    ],
    ids=[
        "empty-string", "empty-in-list", "empty-list", "token-ids", "non-string",
        "over-cap", "too-long", "too-many-words", "dimensions", "encoding-format", "unknown-field", "missing-input",
    ],
)
def test_bad_embedding_input_is_an_openai_shaped_400(
    http: httpx.Client, body: dict[str, Any], message: str, param: str, code: str | None
) -> None:
    response = http.post("/v1/embeddings", json={"model": "minilm", **body})
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


def test_embeddings_from_an_llm_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model=VLLM_MODEL, input="hi")
    assert caught.value.body["code"] == "model_not_supported"


def test_embedding_model_answers_kserve_predict_too(http: httpx.Client, minilm: Any) -> None:
    response = http.post("/v1/models/minilm:predict", json={"instances": SENTENCES[:2]})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    for got, want in zip(predictions, minilm.encode(SENTENCES[:2])):
        assert cosine(got, want) >= 0.999
