"""The key check in front of every ``/v1`` and ``/v2`` route, vLLM's tokenizer
routes, and the operations routes.

With API keys configured, a request to those routes must name one in
``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, as Anthropic's
clients send it); otherwise it is answered 401
(``invalid_api_key``) before any route sees it. Health, readiness and
metrics (the Open Inference Protocol's ``/v2/health/live`` and
``/v2/health/ready`` too) stay open unless operations keys are configured;
then they want one of those (and API keys do not open them, nor do
operations keys open the API). The API docs stay open. The key found is kept in the request's state
(``api_key(request)``) and its id in the request's record, so metrics and the
access log name it (never the secret).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth.keys import ApiKey, KeyTable
from gateway.errors import AuthenticationError
from gateway.http.handlers import envelope, note_refusal
from gateway.http.observe import route_path

PROTECTED = ("/v1/", "/v2/", "/tokenize", "/detokenize")
# Server metadata: the Open Inference Protocol's root, behind the keys as the rest of ``/v2``.
PROTECTED_EXACT = frozenset({"/v2"})
# Probes and scrapes; checked before PROTECTED, which holds the ``/v2`` probes' prefix.
OPERATIONS = frozenset({"/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready", "/ping", "/version"})


def api_key(request: Request) -> ApiKey | None:
    """The key the request was let in with (None: the gateway is open)."""
    key: ApiKey | None = request.scope.get("state", {}).get("api_key")
    return key


class KeyGuard:
    """``keys`` returns the key table now in force (it changes on redeploy)."""

    def __init__(self, app: ASGIApp, keys: Any) -> None:
        self._app = app
        self._keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        table: KeyTable = self._keys()
        if scope["type"] != "http" or not (table or table.guards_ops):
            await self._app(scope, receive, send)
            return
        path = route_path(scope)  # the path the routes match: a prefix `/v` is no prefix of `/v1/...`
        if path in OPERATIONS:
            check = table.authenticate_ops if table.guards_ops else None
        elif table and (path.startswith(PROTECTED) or path in PROTECTED_EXACT):
            check = table.authenticate
        else:
            check = None
        if check is None:
            await self._app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if header is None:
            secret = next((v for k, v in scope["headers"] if k == b"x-api-key"), None)
            header = b"Bearer " + secret if secret is not None else None
        try:
            key = check(header.decode("latin-1") if header is not None else None)
        except AuthenticationError as error:
            await _refuse(scope, send, error, path)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        state["api_key"] = key
        record = state.get("record")
        if record is not None:
            record.key = key.id
        await self._app(scope, receive, send)


async def _refuse(scope: Scope, send: Send, error: AuthenticationError, path: str) -> None:
    note_refusal(scope, error)
    body = json.dumps(envelope(error, path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
