"""schemathesis against the live gateway, from the gateway's own OpenAPI document.

For each endpoint with a body, requests generated from the document (valid
ones, and ones that break it) go to real models: the echo engine, the vLLM
engine, MiniLM and the iris classifier, and names that are no model. Each
must be answered below 500 and, when an error, in OpenAI's envelope
(Anthropic's on the Messages API's routes). The
model and the output budget are picked by the test (so the vLLM engine is
reached and stays quick); every other field is the fuzzer's. Example counts
are bounded and the examples derandomized, so a run is the same each time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.integration.conftest import VLLM_MODEL, Gateway

EXAMPLES = 40  # per endpoint and mode
LLMS = ["echo", VLLM_MODEL, "chat", "no-such-model"]
MODELS = {
    "/v1/chat/completions": LLMS,
    "/v1/completions": LLMS,
    "/v1/responses": LLMS,
    "/v1/responses/input_tokens": LLMS,
    "/v1/messages": LLMS,
    "/v1/messages/count_tokens": LLMS,
    "/v1/embeddings": ["minilm", "embed", "echo", "no-such-model"],
    "/v1/models/{model}:predict": ["iris", "iris-ab", "minilm", "no-such-model"],
    "/v2/models/{model}/infer": ["iris", "minilm", "no-such-model"],
}


@pytest.fixture(scope="module")
def schema(gateway: Gateway) -> Any:
    return schemathesis.openapi.from_url(gateway.base_url + "/openapi.json")


def _quick(body: Any) -> Any:
    """Keeps a generation request cheap: a small output budget and few choices."""
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if isinstance(body.get(field), int) and not isinstance(body.get(field), bool):
                body[field] = max(-1, min(body[field], 8))
        if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool):
            body["n"] = min(body["n"], 2)
    return body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize("path", list(MODELS))
def test_fuzzed_requests_are_never_answered_5xx(gateway: Gateway, schema: Any, path: str, mode: GenerationMode) -> None:
    operation = schema[path]["POST"]
    in_path = "{model}" in path
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), model=st.sampled_from(MODELS[path]))
    def check(case: Any, model: str) -> None:
        if in_path:
            case.path_parameters = {"model": model}
        elif isinstance(case.body, dict):
            case.body["model"] = model
        case.body = _quick(case.body)
        response = case.call(base_url=gateway.base_url, session=session, timeout=60)
        sent = json.dumps(case.body, default=repr)[:500]
        assert response.status_code < 500, f"{response.status_code} {response.text[:500]} for {sent}"
        if response.status_code >= 400 and path.startswith("/v1/messages"):
            assert response.json()["type"] == "error", sent  # Anthropic's envelope
            assert set(response.json()["error"]) == {"type", "message"}, sent
        elif response.status_code >= 400 and path.startswith("/v2/"):
            assert isinstance(response.json()["error"], str), sent  # the Open Inference Protocol's
        elif response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, sent

    try:
        check()
    finally:
        session.close()
