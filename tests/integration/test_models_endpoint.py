"""GET /v1/models, /v1/models/{id}, /health and /ready."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import LORA, VLLM_CONTEXT, VLLM_MODEL


def test_list_models_names_every_served_model(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {
        VLLM_MODEL, "echo", "echo-b", "echo-copy", "echo-narrow", "iris", "iris-tree", "minilm", LORA,
        "chat", "vllm-alias", "fb", "mirrored", "iris-ab", "embed", "lora-ab", "vllm-fb",
    }
    assert models[VLLM_MODEL].model_extra["max_model_len"] == VLLM_CONTEXT
    kinds = {name: m.model_extra["kind"] for name, m in models.items()}
    assert (kinds["echo"], kinds["iris"], kinds["minilm"], kinds["iris-ab"], kinds["embed"]) == (
        "llm", "classifier", "embedding", "classifier", "embedding"
    )
    assert all(m.object == "model" for m in models.values())


def test_alias_entry_lists_its_variants_and_weights(client: openai.OpenAI) -> None:
    alias = client.models.retrieve("chat")
    assert alias.model_extra["variants"] == [
        {"id": "echo", "weight": 80.0},
        {"id": "echo-b", "weight": 20.0},
    ]


def test_retrieve_model(client: openai.OpenAI) -> None:
    model = client.models.retrieve(VLLM_MODEL)
    assert model.id == VLLM_MODEL
    assert model.owned_by == "llm-gateway"


def test_retrieve_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "to"), [("/v1/models/", "/v1/models"), (f"/v1/models/{VLLM_MODEL}/", f"/v1/models/{VLLM_MODEL}")]
)
def test_a_trailing_slash_is_redirected_as_on_every_route(http: httpx.Client, path: str, to: str) -> None:
    """`/v1/models/` was answered 404 for a model named "" (the id may hold slashes: Hugging Face ids)."""
    moved = http.get(path, params={"after": "x"})
    assert moved.status_code == 307 and httpx.URL(moved.headers["location"]).path == to
    assert "after=x" in moved.headers["location"]
    assert http.get(path, follow_redirects=True).status_code == 200


def test_a_wrong_method_names_every_method_the_path_takes(http: httpx.Client) -> None:
    for path, allowed in (("/health", {"GET", "HEAD"}), ("/v1/responses/resp_x", {"GET", "DELETE"})):
        refused = http.patch(path)
        assert refused.status_code == 405
        assert set(refused.headers["allow"].split(", ")) == allowed, path


def test_health_and_ready(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200
    assert set(ready.json()["deployments"].values()) == {"HEALTHY"}


def test_probes_answer_head_with_the_status_and_no_body(http: httpx.Client) -> None:
    # Load balancers' and uptime checkers' probes often send HEAD.
    for path in ("/health", "/ready"):
        head = http.head(path)
        assert head.status_code == 200, (path, head.status_code)
        assert head.content == b""
        assert head.headers["content-type"] == "application/json"
