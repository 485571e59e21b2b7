"""gateway/http/routes/v2.py: the Open Inference Protocol's health and
metadata routes, what they answer, and which keys open them."""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_secret
from gateway.config import FrontDoorConfig
from gateway.errors import ModelNotFoundError, ModelNotSupportedError
from gateway.http.api import build_api
from gateway.http.handlers import envelope  # errors as the gateway's handlers send them on a path
from gateway.http.state import GatewayState

MODELS = [
    {"name": "iris", "engine": "sklearn", "model": "/m/iris"},
    {"name": "iris-tree", "engine": "sklearn", "model": "/m/iris-tree"},
    {"name": "st/minilm", "engine": "sentence-transformers", "model": "/m/minilm"},
    {"name": "chat", "engine": "echo"},
]
ROUTING = {"routes": [{"name": "iris-ab", "variants": {"iris": 1, "iris-tree": 1}}]}
HEALTHY = {"GatewayIngress": "HEALTHY", "ClassicalServer:iris": "HEALTHY", "ClassicalServer:iris-tree": "HEALTHY"}
API, OPS = "sk-gw-api", "sk-gw-ops"
MINILM_ONLY = "sk-gw-minilm"
MODEL_PATHS = ("/v2/models/{model}", "/v2/models/{model}/ready")


class Statuses:
    """Stands in for Serve's deployment statuses, as ``/ready`` reads them."""

    def __init__(self) -> None:
        self.now: dict[str, str] = {**HEALTHY, "ClassicalServer:st/minilm": "HEALTHY", "LLMServer:chat": "HEALTHY"}

    async def __call__(self) -> dict[str, str]:
        return dict(self.now)


class NoHandle:
    """A model's handle, never called: these routes do not reach the models."""

    def options(self, **_: Any) -> NoHandle:
        return self


def gateway_app(statuses: Statuses, keys: list[dict[str, Any]] | None = None) -> Any:
    state = GatewayState(FrontDoorConfig(), lambda model: NoHandle(), lambda model: f"app:{model.name}")
    state.apply(MODELS, ROUTING, keys or [])
    state.deployment_statuses = statuses  # type: ignore[method-assign]
    return build_api(state)


@pytest.fixture
def statuses() -> Statuses:
    return Statuses()


@asynccontextmanager
async def _client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture
async def client(statuses: Statuses) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(gateway_app(statuses)) as client:
        yield client


@pytest.fixture
async def keyed(statuses: Statuses) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway with API keys (one for ``st/minilm`` alone) and an operations key."""
    keys = [
        {"id": "team", "hash": hash_secret(API)},
        {"id": "minilm", "hash": hash_secret(MINILM_ONLY), "models": ["st/minilm"]},
        {"id": "prometheus", "hash": hash_secret(OPS), "ops": True},
    ]
    async with _client(gateway_app(statuses, keys)) as client:
        yield client


def _bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def test_server_live_answers_live(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/health/live")
    assert (response.status_code, response.json()) == (200, {"live": True})
    assert (await client.head("/v2/health/live")).status_code == 200


async def test_server_ready_follows_every_deployment_as_ready_does(
    client: httpx.AsyncClient, statuses: Statuses
) -> None:
    response = await client.get("/v2/health/ready")
    assert (response.status_code, response.json()) == (200, {"ready": True})
    statuses.now["LLMServer:chat"] = "DEPLOYING"  # any model, the V2 route's or not, as /ready counts it
    response = await client.get("/v2/health/ready")
    assert (response.status_code, response.json()) == (503, {"ready": False})
    assert (await client.get("/ready")).status_code == 503
    assert (await client.head("/v2/health/ready")).status_code == 503


async def test_server_metadata_names_the_gateway_and_its_version(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2")
    assert response.status_code == 200
    assert response.json() == {
        "name": "llm-gateway", "version": importlib.metadata.version("llm-gateway"), "extensions": [],
    }


async def test_a_classifiers_metadata_is_what_the_inference_route_takes_and_answers(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/models/iris")
    assert response.status_code == 200
    assert response.json() == {
        "name": "iris",
        "platform": "sklearn",
        "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, -1]}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP64", "shape": [-1, -1]},
        ],
    }
    alias = (await client.get("/v2/models/iris-ab")).json()
    assert alias == {**response.json(), "name": "iris-ab"}


async def test_an_embedding_models_metadata_takes_texts_and_answers_vectors(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/models/st/minilm")  # a name with a slash, as the inference route takes it
    assert response.status_code == 200
    assert response.json() == {
        "name": "st/minilm",
        "platform": "sentence-transformers",
        "inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}],
    }


async def test_model_ready_follows_the_models_deployment(client: httpx.AsyncClient, statuses: Statuses) -> None:
    response = await client.get("/v2/models/iris/ready")
    assert (response.status_code, response.json()) == (200, {"name": "iris", "ready": True})
    statuses.now["ClassicalServer:iris"] = "UNHEALTHY"
    response = await client.get("/v2/models/iris/ready")
    assert (response.status_code, response.json()) == (503, {"name": "iris", "ready": False})
    ready = await client.get("/v2/models/st/minilm/ready")  # another model's state is not this one's
    assert (ready.status_code, ready.json()) == (200, {"name": "st/minilm", "ready": True})


async def test_an_alias_is_ready_when_every_variant_is(client: httpx.AsyncClient, statuses: Statuses) -> None:
    assert (await client.get("/v2/models/iris-ab/ready")).json() == {"name": "iris-ab", "ready": True}
    del statuses.now["ClassicalServer:iris-tree"]  # its application lists no deployment yet
    response = await client.get("/v2/models/iris-ab/ready")
    assert (response.status_code, response.json()) == (503, {"name": "iris-ab", "ready": False})


@pytest.mark.parametrize("template", MODEL_PATHS)
async def test_an_unknown_model_is_not_found(client: httpx.AsyncClient, template: str) -> None:
    path = template.format(model="nope")
    response = await client.get(path)
    assert (response.status_code, response.json()) == (404, envelope(ModelNotFoundError.for_model("nope"), path))


@pytest.mark.parametrize("template", MODEL_PATHS)
async def test_an_llm_is_not_served_by_the_inference_route(client: httpx.AsyncClient, template: str) -> None:
    path = template.format(model="chat")
    response = await client.get(path)
    assert response.status_code == 404
    error = ModelNotSupportedError("The model `chat` (llm) does not serve /v2/models/chat/infer.", param="model")
    assert response.json() == envelope(error, path)


@pytest.mark.parametrize("template", MODEL_PATHS)
async def test_a_model_the_key_may_not_use_is_answered_as_unknown(keyed: httpx.AsyncClient, template: str) -> None:
    path = template.format(model="iris")
    response = await keyed.get(path, headers=_bearer(MINILM_ONLY))
    assert (response.status_code, response.json()) == (404, envelope(ModelNotFoundError.for_model("iris"), path))
    allowed = await keyed.get(template.format(model="st/minilm"), headers=_bearer(MINILM_ONLY))
    assert allowed.status_code == 200


async def test_a_get_to_the_inference_route_is_still_a_wrong_method(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/models/iris/infer")
    assert response.status_code == 405 and response.headers["allow"] == "POST"


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready"])
async def test_the_health_routes_are_probes_that_api_keys_neither_need_nor_open(
    keyed: httpx.AsyncClient, path: str
) -> None:
    """Open without operations keys, as /health and /ready are; with them, one of those."""
    async with _client(gateway_app(Statuses(), [{"id": "team", "hash": hash_secret(API)}])) as client:
        assert (await client.get(path)).status_code == 200
    assert (await keyed.get(path)).status_code == 401
    assert (await keyed.get(path, headers=_bearer(API))).status_code == 401
    assert (await keyed.get(path, headers=_bearer(OPS))).status_code == 200


@pytest.mark.parametrize("path", ["/v2", "/v2/models/iris", "/v2/models/iris/ready"])
async def test_metadata_and_model_ready_want_an_api_key(keyed: httpx.AsyncClient, path: str) -> None:
    assert (await keyed.get(path)).status_code == 401
    assert (await keyed.get(path, headers=_bearer(OPS))).status_code == 401
    assert (await keyed.get(path, headers=_bearer(API))).status_code == 200
    assert (await keyed.get(path, headers={"x-api-key": API})).status_code == 200
