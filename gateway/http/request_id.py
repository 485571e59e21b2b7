"""Gives every request an id, shared by the response header and the engine.

Serve's proxy already keeps a client's ``x-request-id`` (or makes one), puts
it in the request headers and echoes it on the response; this middleware
reuses that id, so chunk ids (``chatcmpl-<id>``) and logs carry it too. Where
no proxy set one (the app run on its own), it makes one and sets the header.
Pure ASGI: next to no cost per request.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_SANE = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER)
        state: dict[str, Any] = scope.setdefault("state", {})
        if given is not None:
            state["request_id"] = given.decode() if _SANE.match(given) else new_request_id()
            await self._app(scope, receive, send)
            return
        request_id = new_request_id()
        state["request_id"] = request_id
        header = (HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self._app(scope, receive, send_with_id)
