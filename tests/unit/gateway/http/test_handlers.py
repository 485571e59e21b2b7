"""gateway/http/handlers.py: every failure leaves as the OpenAI error envelope (Anthropic's on its routes)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, Field
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from gateway.errors import (
    ContextLengthExceededError,
    GatewayError,
    InternalServerError,
    InvalidRequestError,
    ModelNotFoundError,
    NotImplementedFeatureError,
    OverloadedError,
    RateLimitError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from gateway.http.access_log import AccessLog
from gateway.http.handlers import as_gateway_error, install_handlers

ENVELOPE_KEYS = {"message", "type", "param", "code"}


class _Body(BaseModel):
    model: str
    n: int = Field(1, ge=1)


def _app(raised: dict[str, BaseException]) -> FastAPI:
    app = FastAPI()
    install_handlers(app)

    @app.get("/raise")
    async def raise_() -> None:
        raise raised["error"]

    @app.get("/v1/messages/raise")
    async def raise_anthropic() -> None:
        raise raised["error"]

    @app.get("/v2/models/m/raise")
    async def raise_inference() -> None:
        raise raised["error"]

    @app.post("/typed")
    async def typed(body: _Body) -> dict[str, Any]:
        return body.model_dump()

    @app.get("/items/{item}")
    async def get_item(item: str) -> str:
        return item

    @app.delete("/items/{item}")
    async def delete_item(item: str) -> str:
        return item

    return app


@pytest.fixture
def raised() -> dict[str, BaseException]:
    return {}


@pytest.fixture
async def client(raised: dict[str, BaseException]) -> AsyncIterator[httpx.AsyncClient]:
    # A handler for Exception runs in Starlette's ServerErrorMiddleware, which
    # re-raises after responding (so the server logs it); the client sees the 500.
    transport = httpx.ASGITransport(app=_app(raised), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ENVELOPE_KEYS
    return body["error"]


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (InvalidRequestError("bad n", param="n"), 400, None),
        (ContextLengthExceededError("too long", param="messages"), 400, None),
        (ModelNotFoundError.for_model("gpt-9"), 404, None),
        (NotImplementedFeatureError("no beams"), 400, None),
        (ServiceUnavailableError("down", retry_after_s=2), 503, "2"),
        (OverloadedError("busy", status=429, retry_after_s=5), 429, "5"),
        (InternalServerError("oops"), 500, None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, GatewayError) else None,
)
async def test_gateway_errors_become_envelopes(
    client: httpx.AsyncClient,
    raised: dict[str, BaseException],
    error: GatewayError,
    status: int,
    retry_after: str | None,
) -> None:
    raised["error"] = error

    response = await client.get("/raise")

    assert response.status_code == status
    assert _error(response) == error.to_dict()["error"]
    assert response.headers.get("retry-after") == retry_after


async def test_validation_error_is_400_envelope(client: httpx.AsyncClient) -> None:
    response = await client.post("/typed", json={"model": "echo", "n": 0})

    assert response.status_code == 400
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "n"
    assert error["message"] == "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."
    assert "detail" not in response.json()


@pytest.mark.parametrize(
    "kwargs",
    [{"json": {"n": 2}}, {"content": b"{not json", "headers": {"content-type": "application/json"}}, {}],
    ids=["missing-field", "broken-json", "no-body"],
)
async def test_bad_bodies_are_400_never_422(client: httpx.AsyncClient, kwargs: dict[str, Any]) -> None:
    response = await client.post("/typed", **kwargs)

    assert response.status_code == 400
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    assert "detail" not in response.json()
    if "json" in kwargs:
        assert (error["param"], error["message"]) == ("model", "Missing required parameter: 'model'.")
    else:
        assert (error["param"], error["message"]) == (None, "We could not parse the JSON body of your request. "
                                                      "The body must be valid JSON.")


async def test_good_body_passes(client: httpx.AsyncClient) -> None:
    response = await client.post("/typed", json={"model": "echo", "n": 2})

    assert response.status_code == 200
    assert response.json() == {"model": "echo", "n": 2}


async def test_unknown_route_is_404_envelope(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing")

    assert response.status_code == 404
    error = _error(response)
    assert error["code"] == "not_found"
    assert error["type"] == "invalid_request_error"
    assert "/v1/nothing" in error["message"]


async def test_wrong_method_is_405_envelope(client: httpx.AsyncClient) -> None:
    response = await client.delete("/typed")

    assert response.status_code == 405
    error = _error(response)
    assert error["code"] == "method_not_allowed"
    assert "DELETE" in error["message"]
    assert response.headers["allow"] == "POST"


async def test_a_405_allows_every_method_the_path_is_served_by(client: httpx.AsyncClient) -> None:
    """Starlette's `Allow` names only the first route's methods: `GET` where DELETE works too."""
    response = await client.patch("/items/a")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET"


async def test_unexpected_exception_is_500_without_details(
    client: httpx.AsyncClient, raised: dict[str, BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    raised["error"] = RuntimeError("secret at /srv/app/engine.py line 12")

    with caplog.at_level(logging.ERROR, logger="gateway.http.handlers"):
        response = await client.get("/raise")

    assert response.status_code == 500
    error = _error(response)
    assert error["type"] == "server_error"
    assert error["code"] == "internal_error"
    for leak in ("secret", "Traceback", ".py", "/srv", "RuntimeError"):
        assert leak not in error["message"]
    # The details go to the logs instead.
    assert any(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in caplog.records)


def test_backpressure_becomes_overloaded_with_retry_after() -> None:
    error = as_gateway_error(BackPressureError(num_queued_requests=5, max_queued_requests=5))

    assert isinstance(error, OverloadedError)
    assert error.status_code == 503
    assert error.code == "overloaded"
    assert error.headers() == {"retry-after": "1"}


def test_backpressure_keeps_serve_status_and_retry() -> None:
    exc = BackPressureError(num_queued_requests=5, max_queued_requests=5, status_code=429, retry_after_s=3.0)

    error = as_gateway_error(exc, retry_after_s=9)

    assert isinstance(error, OverloadedError)
    assert error.status_code == 429
    assert error.headers() == {"retry-after": "3"}


def test_replica_error_is_unwrapped_from_ray_task_error() -> None:
    cause = ContextLengthExceededError("too long", param="messages")
    wrapped = RayTaskError(function_name="f", traceback_str="tb", cause=cause)

    error = as_gateway_error(wrapped)

    assert error is cause
    assert error.code == "context_length_exceeded"
    assert error.status_code == 400


def test_gateway_error_passes_through() -> None:
    error = InvalidRequestError("bad")

    assert as_gateway_error(error) is error


def test_unknown_exception_becomes_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway.http.handlers"):
        error = as_gateway_error(ValueError("/home/x/secret.py"))

    assert isinstance(error, InternalServerError)
    assert "secret" not in error.message


@pytest.mark.parametrize(
    ("error", "anthropic_type"),
    [
        (InvalidRequestError("bad", param="max_tokens"), "invalid_request_error"),
        (ModelNotFoundError.for_model("claude-9"), "not_found_error"),
        (OverloadedError("busy", status=429, retry_after_s=5), "overloaded_error"),
        (RateLimitError("slow down", retry_after_s=2), "rate_limit_error"),
        (ServiceUnavailableError("down"), "overloaded_error"),
        (RequestTimeoutError("late"), "timeout_error"),
        (InternalServerError("oops"), "api_error"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, GatewayError) else None,
)
async def test_errors_on_anthropics_routes_take_its_envelope(
    client: httpx.AsyncClient, raised: dict[str, BaseException], error: GatewayError, anthropic_type: str
) -> None:
    raised["error"] = error
    response = await client.get("/v1/messages/raise")
    # Overloaded is Anthropic's 529 (the SDK's OverloadedError), where OpenAI's routes answer 503 or 429.
    assert response.status_code == (529 if anthropic_type == "overloaded_error" else error.status_code)
    assert response.json() == {"type": "error", "error": {"type": anthropic_type, "message": error.message}}
    assert response.headers.get("retry-after") == error.headers().get("retry-after")


async def test_errors_under_v2_take_the_open_inference_protocols_shape(
    client: httpx.AsyncClient, raised: dict[str, BaseException]
) -> None:
    """``{"error": <message>}``, where tritonclient and KServe's clients read it (they showed the whole envelope)."""
    raised["error"] = InvalidRequestError("inputs[0]: shape [2] holds 2 values but 'data' has 1", param="inputs")
    response = await client.get("/v2/models/m/raise")
    assert (response.status_code, response.json()) == (400, {"error": raised["error"].message})
    unknown = await client.get("/v2/models/m/versions/1/nothing")
    assert (unknown.status_code, unknown.json()) == (404, {"error": "Unknown route: GET /v2/models/m/versions/1/nothing"})


async def test_under_a_route_prefix_anthropics_routes_still_take_its_envelope(
    raised: dict[str, BaseException],
) -> None:
    # Serve puts an application's route prefix in ``root_path`` and leaves it in ``path``.
    transport = httpx.ASGITransport(app=_app(raised), raise_app_exceptions=False, root_path="/api")
    raised["error"] = ServiceUnavailableError("down")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        messages = await client.get("/api/v1/messages/raise")
        chat = await client.get("/api/raise")
    assert (messages.status_code, chat.status_code) == (529, 503)
    assert messages.json() == {"type": "error", "error": {"type": "overloaded_error", "message": "down"}}
    assert _error(chat)["code"] == "service_unavailable"


@pytest.mark.parametrize(
    ("error", "retry_after"),
    [
        (OverloadedError("busy", retry_after_s=1), "7"),  # as the relay and the replicas say it
        (ServiceUnavailableError("down"), "7"),
        (OverloadedError("busy", status=429, retry_after_s=1), "7"),  # (Serve's 429 for a full queue)
        (RateLimitError("over the key's limit", retry_after_ms=2500), "3"),  # when the key's limit frees: its own
        (InternalServerError("oops"), None),
    ],
    ids=["overloaded", "unavailable", "overloaded-429", "rate-limited", "internal"],
)
async def test_a_busy_or_down_model_is_retried_after_the_configured_time(
    raised: dict[str, BaseException], error: GatewayError, retry_after: str | None
) -> None:
    app = _app(raised)
    ingress = SimpleNamespace(retry_after_s=7)  # ingress.retry_after_s
    app.state.gateway = SimpleNamespace(front_door=SimpleNamespace(ingress=ingress), access_log=AccessLog("off"))
    raised["error"] = error
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/raise")
    assert response.headers.get("retry-after") == retry_after


async def test_an_overloaded_error_on_anthropics_routes_is_logged_with_the_529_it_was_answered(
    raised: dict[str, BaseException],
) -> None:
    app = _app(raised)
    logged: list[tuple[object, ...]] = []
    log = SimpleNamespace(error=lambda *line: logged.append(line))
    ingress = SimpleNamespace(retry_after_s=7)
    app.state.gateway = SimpleNamespace(front_door=SimpleNamespace(ingress=ingress), access_log=log)

    @app.middleware("http")
    async def recorded(request: Any, call_next: Any) -> Any:  # as the observability middleware keeps its record
        request.state.record = SimpleNamespace(request_id="r1", error=None)
        return await call_next(request)

    raised["error"] = OverloadedError("busy", status=429, retry_after_s=1)  # Serve's 429 for a full queue
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/v1/messages/raise")).status_code == 529
        assert (await client.get("/raise")).status_code == 429  # OpenAI's routes: a 4xx, not in the error log
    assert logged == [("r1", 529, "overloaded", "busy")]
