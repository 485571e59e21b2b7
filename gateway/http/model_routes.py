"""The model endpoints whose path names no model (chat, completions,
responses, messages, embeddings), served ahead of FastAPI's router.

A POST to one of them goes from the middleware stack straight to the
dispatcher: no route matching over every route, no dependency solving, no
exception middleware and request wrapper per request, which together cost
about a tenth of an ingress's CPU per request. The FastAPI routes for these
paths stay: they describe the endpoints in the OpenAPI document and answer
other methods (405). Errors take the app's own exception handlers, looked up
as Starlette's exception middleware does, so a client cannot tell which way
a request went.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.http.endpoints import ENDPOINTS
from gateway.http.observe import route_path
from gateway.protocol.engine import Endpoint

# Each endpoint whose path is fixed: where its POSTs go.
PATHS: Mapping[str, Endpoint] = {spec.path: name for name, spec in ENDPOINTS.items() if "{" not in spec.path}

Handler = Callable[[Request, Exception], Any]


class ModelRoutes:
    """ASGI middleware: POSTs to ``PATHS`` are answered by the gateway state's
    dispatcher; everything else goes on to ``app``. ``handlers`` are the
    app's exception handlers; one for ``Exception`` itself is left to
    Starlette's server-error middleware, as FastAPI's routes leave it."""

    def __init__(self, app: ASGIApp, handlers: Mapping[Any, Handler]) -> None:
        self._app = app
        self._handlers = {cls: handler for cls, handler in handlers.items() if cls not in (Exception, 500)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = PATHS.get(route_path(scope)) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self._app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await request.app.state.gateway.dispatcher.dispatch(endpoint, request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            if cls in self._handlers:
                return self._handlers[cls]
        return None
