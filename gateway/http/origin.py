"""Browser pages of other origins are kept away from the models.

A browser sends some cross-origin requests without asking first (a "simple"
request: a POST whose body is labelled ``text/plain``), so the absence of
CORS headers only keeps a page from reading the answer, not from having the
model generate it. A request to ``/v1`` or ``/v2`` that carries an ``Origin``
header (browsers send one; SDKs and curl do not) is answered 403 unless that
origin is the gateway's own host or one ``ingress.cors`` names.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import PermissionDeniedError
from gateway.http.auth import PROTECTED
from gateway.http.handlers import envelope


class OriginGuard:
    """``origins`` are those ``ingress.cors`` names (``*``: any), as browsers send them."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self._app = app
        self._any = "*" in origins
        self._origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._any:
            await self._app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        path = scope["path"].removeprefix(scope.get("root_path", "").rstrip("/"))
        if origin is None or not path.startswith(PROTECTED) or self._allowed(origin, scope):
            await self._app(scope, receive, send)
            return
        error = PermissionDeniedError(
            f"Requests from pages of {origin} are not allowed: this gateway serves browser pages of "
            "its own host, and of other origins only as `ingress.cors` names them."
        )
        body = json.dumps(envelope(error, path)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, origin: str, scope: Scope) -> bool:
        """A named origin, or a page of the host the request was sent to."""
        if origin.rstrip("/").lower() in self._origins:
            return True
        host = _header(scope, b"host")
        try:
            page = urlsplit(origin).hostname
            own = urlsplit("//" + host).hostname if host else None
        except ValueError:
            return False
        return page is not None and page == own


def _header(scope: Any, name: bytes) -> str | None:
    value = next((v for k, v in scope["headers"] if k == name), None)
    return value.decode("latin-1") if value is not None else None
