"""One place that turns every failure into the OpenAI error envelope."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from gateway.errors import (
    GatewayError,
    InternalServerError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    OverloadedError,
    ServiceUnavailableError,
)
from gateway.http.observe import anthropic_path, current_request_id, route_path
from gateway.validation import Refusal, describe

logger = logging.getLogger(__name__)


# The Open Inference Protocol's routes (``/v2`` and below), whose errors are its own shape.
INFERENCE_ROOT = "/v2"


def note_refusal(scope: MutableMapping[str, Any], error: GatewayError) -> None:
    """Names a guard's refusal (401, 403) on the request's access-log line,
    as an error the app answers is named."""
    record = scope.get("state", {}).get("record")
    if record is not None:
        record.error = error.code or error.type


def envelope(error: GatewayError, path: str) -> dict[str, object]:
    """``error`` in the envelope the route at ``path`` answers with:
    Anthropic's on its routes, the Open Inference Protocol's under ``/v2``,
    OpenAI's everywhere else."""
    if anthropic_path(path):
        return error.to_anthropic()
    if path == INFERENCE_ROOT or path.startswith(INFERENCE_ROOT + "/"):
        return error.to_inference()
    return error.to_dict()


def error_response(error: GatewayError, request: Request | None = None) -> JSONResponse:
    """The error's envelope (Anthropic's on its routes); with ``request``, also
    noted in its access-log line and, for 5xx, written to the error log under
    the request's id, and a 503's ``Retry-After`` is the ingress's ``retry_after_s``."""
    if request is None:
        return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers())
    path = route_path(request.scope)
    status = error.anthropic_status() if anthropic_path(path) else error.status_code
    _note(request, error, status)
    return JSONResponse(envelope(error, path), status_code=status, headers=error.headers())


def _note(request: Request, error: GatewayError, status: int) -> None:
    state = getattr(request.app.state, "gateway", None)
    if state is not None and isinstance(error, ServiceUnavailableError) and error.retry_after_s is not None:
        # A model busy or down, wherever that was found (the relay, a replica,
        # Serve): the client retries after the configured time.
        error.retry_after_s = state.front_door.ingress.retry_after_s
    record = getattr(request.state, "record", None)
    if record is None:
        return
    record.error = error.code or error.type
    if status >= 500:
        if state is not None:
            state.access_log.error(record.request_id, status, record.error, error.message)


def as_gateway_error(exc: BaseException, *, retry_after_s: int = 1) -> GatewayError:
    """Maps an exception raised by a handle call (or our own code) to a client error.

    A replica's ``GatewayError`` arrives wrapped in Ray's ``RayTaskError``; Serve's
    backpressure and unavailability errors become 503 (or the 429 Serve asks for)
    with ``Retry-After``. Anything else is a bug: logged, and a 500 without details.
    """
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )

    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, BaseException) and cause is not exc:
            return as_gateway_error(cause, retry_after_s=retry_after_s)
    if isinstance(exc, BackPressureError):
        retry = int(exc.retry_after_s) if exc.retry_after_s is not None else retry_after_s
        return OverloadedError(
            "The model is receiving too many requests; please retry shortly.",
            status=exc.status_code,
            retry_after_s=retry,
        )
    if isinstance(
        exc,
        (DeploymentUnavailableError, ReplicaUnavailableError, ActorDiedError, ActorUnavailableError),
    ):
        return ServiceUnavailableError(
            "The model is temporarily unavailable; please retry shortly.",
            retry_after_s=retry_after_s,
        )
    logger.error(
        "request %s: unexpected error while serving it", current_request_id.get(), exc_info=exc
    )
    return InternalServerError("The server had an error while processing your request.")


def allowed_methods(request: Request) -> str:
    """``Allow`` for a 405: the methods of every route at the request's path.
    Starlette names only the first route's, and a path served by several
    (``GET`` and ``DELETE /v1/responses/{id}``; ``GET`` and ``HEAD /health``)
    would be said to take one of them."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def install_handlers(app: FastAPI) -> None:
    """Registers the handlers; FastAPI's 422 ``detail`` bodies never reach a client."""

    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(as_gateway_error(exc), request)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        # FastAPI's locations start with where the field was (``body``); the client's path follows.
        found = [{**error, "loc": tuple(error["loc"][1:])} for error in exc.errors()]
        if not found or found[0]["type"] == "json_invalid" or not found[0]["loc"]:
            refusal = Refusal("We could not parse the JSON body of your request. The body must be valid JSON.", None)
        else:
            refusal = describe(found)
        return error_response(InvalidRequestError(refusal.message, param=refusal.param, code=refusal.code), request)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        error: GatewayError
        if exc.status_code == 404:
            error = NotFoundError(f"Unknown route: {request.method} {request.url.path}")
        elif exc.status_code == 405:
            error = MethodNotAllowedError(f"Method {request.method} is not allowed here.")
            error.extra_headers["allow"] = allowed_methods(request)
        elif exc.status_code < 500:
            error = InvalidRequestError(str(exc.detail), status=exc.status_code)
        else:
            error = InternalServerError("The server had an error while processing your request.")
        error.extra_headers.update({k: v for k, v in (exc.headers or {}).items() if k.lower() != "allow"})
        return error_response(error, request)

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_gateway_error)
