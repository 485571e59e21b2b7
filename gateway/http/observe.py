"""The ASGI middleware every request passes: id, metrics, overhead, access log.

- **Request id.** A client's own ``x-request-id`` is kept when it is sane
  (1-128 of ``A-Za-z0-9._:-``), otherwise one is made; either way the
  response carries it, the model replica's chunk ids use it (``chatcmpl-<id>``)
  and the access and error logs name it. Under Serve (``server_echoes_id``),
  Serve itself echoes the id the request arrived with (HAProxy makes one when
  the client sent none), so the header is added here only when ours differs:
  a client's insane id comes back beside the one the gateway used.
  Anthropic's Messages routes also carry it as ``request-id``, where
  Anthropic's clients read it, on every answer: the gateway's own errors
  (unknown model, 405, a body it cannot read) as well as the model's.
- **Metrics.** In-flight, requests, durations and the gateway's overhead,
  labelled with the route template and what the dispatcher recorded.
- **Overhead header.** Responses that are not streams carry
  ``x-gateway-overhead-ms``: time in the gateway before the response
  started, apart from waiting on the model.
- **Status.** A response that never finished (the client hung up) counts as
  499, as nginx logs it, even when a stream had already started with 200. So
  does a request whose task was cancelled before it answered: Serve's proxy
  (``http_proxy: serve``) cancels a request's task when its client leaves.

Pure ASGI, so the per-request cost stays in microseconds.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.http.access_log import AccessLog
from gateway.metrics.recorder import GatewayMetrics, RequestRecord

REQUEST_ID = b"x-request-id"
ANTHROPIC_REQUEST_ID = b"request-id"
ANTHROPIC_PATH = "/v1/messages"
OVERHEAD = b"x-gateway-overhead-ms"
UNMATCHED = "unmatched"
CLIENT_CLOSED = 499
_SANE = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_CONVERTER = re.compile(r"\{(\w+):\w+\}")

# The id of the request being served, for log lines written deep in a call.
current_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def route_path(scope: Scope) -> str:
    """The path below the app's mount point (``root_path``: the route prefix
    Serve's proxy puts there), as Starlette's router matches it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        return path[len(root) :]
    return path


def anthropic_path(path: str) -> bool:
    """Whether ``path`` is one of Anthropic's Messages API routes, whose
    answers take Anthropic's envelope and ``request-id`` header."""
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


# The methods whose labels are kept per fixed path (any other is looked up each
# time: a method is the client's word, and the kept labels stay few).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_matcher(routes: list[BaseRoute], skip: frozenset[str]) -> Callable[[Scope], str | None]:
    """The route template a request will be matched to (``{model}`` for path
    parameters), ``unmatched``, or None for paths in ``skip`` (not measured).
    As Starlette's router picks it: the first route that takes the path and
    the method, else the first that takes the path (its answer a 405)."""
    ordered = [(route, _CONVERTER.sub(r"{\1}", path)) for route in routes if (path := getattr(route, "path", None))]
    fixed = {path for route, path in ordered if "{" not in path}
    kept: dict[tuple[str, str], str] = {}

    def matched(scope: Scope) -> str:
        partial = None
        for route, template in ordered:
            match = route.matches(scope)[0]
            if match is Match.FULL:
                return template
            if match is Match.PARTIAL and partial is None:
                partial = template
        return partial or UNMATCHED

    def route_of(scope: Scope) -> str | None:
        path = route_path(scope)
        if path in skip:
            return None
        method = scope.get("method", "")
        if path not in fixed or method not in _METHODS:
            return matched(scope)
        label = kept.get((method, path))
        if label is None:
            label = kept[method, path] = matched(scope)
        return label

    return route_of


class ObservabilityMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: GatewayMetrics,
        access_log: AccessLog,
        route_of: Callable[[Scope], str | None],
        server_echoes_id: bool = False,
    ) -> None:
        self._app = app
        self._metrics = metrics
        self._log = access_log
        self._route_of = route_of
        self._echoed = server_echoes_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        given = next((value for key, value in scope["headers"] if key == REQUEST_ID), None)
        sane = given is not None and _SANE.fullmatch(given) is not None
        request_id = given.decode() if sane and given is not None else new_request_id()
        id_headers = [] if sane and self._echoed else [(REQUEST_ID, request_id.encode())]
        if anthropic_path(route_path(scope)):
            id_headers.append((ANTHROPIC_REQUEST_ID, request_id.encode()))
        route = self._route_of(scope)
        record = RequestRecord(request_id, route or "", time.perf_counter())
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["record"] = record
        token = current_request_id.set(request_id)
        try:
            if route is None:
                await self._app(scope, receive, _with_headers(send, id_headers))
            else:
                await self._measured(scope, receive, send, record, id_headers)
        finally:
            current_request_id.reset(token)

    async def _measured(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: RequestRecord,
        id_headers: list[tuple[bytes, bytes]],
    ) -> None:
        metrics = self._metrics
        metrics.request_started(record.route)
        status = 500  # unless a response starts
        overhead_s: float | None = None
        complete = False

        async def observed_send(message: Message) -> None:
            nonlocal status, overhead_s, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                overhead_s = time.perf_counter() - record.started - record.model_wait_s
                metrics.response_started(record.route, overhead_s)
                headers = [*message.get("headers", ()), *id_headers]
                if not _is_stream(headers):
                    headers.append((OVERHEAD, f"{overhead_s * 1000:.3f}".encode()))
                message["headers"] = headers
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        try:
            await self._app(scope, receive, observed_send)
        except asyncio.CancelledError:
            if overhead_s is None:  # unanswered: its caller gave up on it
                status = CLIENT_CLOSED
            raise
        except ClientDisconnect:
            # It hung up while its body was being read: nobody to answer,
            # and nothing failed (not the server error it would be logged as).
            status = CLIENT_CLOSED
        except Exception as exc:
            if overhead_s is not None:
                raise  # (its response started: Starlette's last handler can only log it)
            await _answer_failure(exc, scope, receive, observed_send)
        finally:
            failed = record.late_status is not None and record.late_status >= 500
            if overhead_s is not None and not complete and not failed:
                status = CLIENT_CLOSED
            elif record.late_status is not None:
                status = record.late_status
                if status >= 500:  # a stream cut by a failure: logged as a failure before its first byte is
                    self._log.error(
                        record.request_id, status, record.error, "The stream ended with an error after it started."
                    )
            duration_s = time.perf_counter() - record.started
            metrics.request_finished(record, status, duration_s)
            self._log.request(record, scope["method"], status, duration_s, overhead_s)


async def _answer_failure(exc: Exception, scope: Scope, receive: Receive, send: Send) -> None:
    """A bug's 500, answered here, where the request's id is still known: it
    goes out with its ``x-request-id``, and the traceback and access-log lines
    carry both the id and the error. Starlette's last handler answers outside
    this middleware, with neither."""
    from starlette.requests import Request

    from gateway.http.handlers import as_gateway_error, error_response  # (they import this module)

    await error_response(as_gateway_error(exc), Request(scope))(scope, receive, send)


def _is_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)


def _with_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    if not headers:
        return send

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *headers]
        await send(message)

    return send_with_headers
