"""gateway/http/model_routes.py: model requests skip FastAPI's router, and a client cannot tell."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway.config import FrontDoorConfig
from gateway.errors import GatewayError, InvalidRequestError, ServiceUnavailableError
from gateway.http.api import build_api
from gateway.http.model_routes import PATHS
from gateway.http.state import GatewayState


class Dispatcher:
    """Stands in for the state's dispatcher: answers, or raises ``raises``, and records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Request, str | None]] = []
        self.raises: BaseException | None = None

    async def dispatch(self, endpoint: str, request: Request, model: str | None = None) -> Response:
        self.calls.append((endpoint, request, model))
        if self.raises is not None:
            raise self.raises
        return JSONResponse({"endpoint": endpoint, "body": (await request.json())})


@pytest.fixture
def dispatcher() -> Dispatcher:
    return Dispatcher()


def gateway_app(dispatcher: Dispatcher) -> FastAPI:
    """The ingress's app, its dispatcher replaced by ``dispatcher``."""
    state = GatewayState(FrontDoorConfig.model_validate({}), lambda model: None, lambda model: "")
    app = build_api(state)
    state.dispatcher.dispatch = dispatcher.dispatch  # type: ignore[method-assign]
    return app


@pytest.fixture
async def client(dispatcher: Dispatcher) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=gateway_app(dispatcher), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def test_every_model_endpoint_whose_path_names_no_model_is_served_ahead_of_the_router() -> None:
    assert dict(PATHS) == {
        "/v1/chat/completions": "chat",
        "/v1/completions": "completion",
        "/v1/responses": "responses",
        "/v1/responses/input_tokens": "responses_input_tokens",
        "/v1/messages": "messages",
        "/v1/messages/count_tokens": "messages_count",
        "/tokenize": "tokenize",
        "/detokenize": "detokenize",
        "/v1/embeddings": "embedding",
    }


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_a_model_post_reaches_the_dispatcher_without_the_router(
    client: httpx.AsyncClient, dispatcher: Dispatcher, path: str
) -> None:
    response = await client.post(path, json={"model": "m", "n": 1}, headers={"x-request-id": "id-1"})
    assert response.status_code == 200
    assert response.json() == {"endpoint": PATHS[path], "body": {"model": "m", "n": 1}}
    # The middleware around it still ran: the request's id and overhead are on the answer.
    assert response.headers["x-request-id"] == "id-1" and float(response.headers["x-gateway-overhead-ms"]) > 0
    ((endpoint, request, model),) = dispatcher.calls
    assert (endpoint, model) == (PATHS[path], None)
    assert "route" not in request.scope and "endpoint" not in request.scope  # FastAPI's router never saw it


@pytest.mark.parametrize(
    ("path", "envelope"),
    [
        ("/v1/chat/completions", lambda e: e.to_dict()),
        ("/v1/messages", lambda e: e.to_anthropic()),  # Anthropic's routes answer in its envelope
    ],
)
@pytest.mark.parametrize(
    "error", [InvalidRequestError("bad n", param="n"), ServiceUnavailableError("down", retry_after_s=2)]
)
async def test_an_error_is_answered_by_the_apps_own_handlers(
    client: httpx.AsyncClient, dispatcher: Dispatcher, path: str, envelope: Any, error: GatewayError
) -> None:
    dispatcher.raises = error
    response = await client.post(path, json={"model": "m"})
    anthropics = path.startswith("/v1/messages")  # its routes answer an overloaded_error 529, as Anthropic's API
    assert response.status_code == (error.anthropic_status() if anthropics else error.status_code)
    assert response.json() == envelope(error)
    assert response.headers.get("retry-after") == error.headers().get("retry-after")


async def test_an_unexpected_error_is_a_500_without_details(
    client: httpx.AsyncClient, dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher.raises = RuntimeError("secret detail")
    response = await client.post("/v1/chat/completions", json={"model": "m"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "secret detail" not in response.text
    assert "secret detail" in caplog.text  # for the operator, under the request's id


async def test_under_a_route_prefix_the_path_below_it_counts(dispatcher: Dispatcher) -> None:
    transport = httpx.ASGITransport(app=gateway_app(dispatcher), root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/api/v1/chat/completions", json={"model": "m"})
    assert response.status_code == 200 and response.json()["endpoint"] == "chat"
    ((_, request, _),) = dispatcher.calls
    assert "route" not in request.scope


@pytest.mark.parametrize(
    ("prefix", "path"), [("/v", "/v1/chat/completions"), ("/t", "/tokenize"), ("/api", "/api/v1/models")]
)
async def test_a_route_prefix_that_merely_begins_a_model_path_does_not_take_it_past_the_key_check(
    dispatcher: Dispatcher, prefix: str, path: str
) -> None:
    # Serve's replica port hands the app any path beginning with its prefix, `/v1/...` under `/v`;
    # the routes match it whole (no `/` after the prefix), and so must the key check.
    from gateway.auth.keys import KeyTable, hash_secret, new_secret
    from gateway.config import KeyConfig

    app = gateway_app(dispatcher)
    secret = new_secret()
    app.state.gateway.keys = KeyTable([KeyConfig.model_validate({"id": "team-a", "hash": hash_secret(secret)})])
    transport = httpx.ASGITransport(app=app, root_path=prefix)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        method, body = ("GET", None) if path.endswith("/models") else ("POST", {"model": "m", "prompt": "hi"})
        refused = await client.request(method, path, json=body)
        assert refused.status_code == 401, refused.text
        let_in = await client.request(method, path, json=body, headers={"authorization": f"Bearer {secret}"})
        assert let_in.status_code != 401


async def test_other_methods_and_paths_take_fastapis_routes(client: httpx.AsyncClient, dispatcher: Dispatcher) -> None:
    wrong_method = await client.get("/v1/chat/completions")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "POST"
    assert dispatcher.calls == []
    # A GET to the predict route is a wrong method too, not an unknown model `iris:predict`.
    wrong_method = await client.get("/v1/models/iris:predict")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    predicted = await client.post("/v1/models/iris:predict", json={"instances": [[1, 2]]})
    assert predicted.status_code == 200
    ((endpoint, request, model),) = dispatcher.calls
    assert (endpoint, model) == ("predict", "iris") and "route" in request.scope
