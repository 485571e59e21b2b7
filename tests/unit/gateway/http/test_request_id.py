"""gateway/http/request_id.py: one id per request, shared by app and response."""

from __future__ import annotations

import re

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.http.request_id import RequestIdMiddleware

GENERATED = re.compile(r"^[0-9a-f]{32}$")


async def _whoami(request: Request) -> JSONResponse:
    return JSONResponse({"request_id": request.state.request_id})


def _client() -> httpx.AsyncClient:
    app = RequestIdMiddleware(Starlette(routes=[Route("/whoami", _whoami)]))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_without_header_a_new_id_is_made_and_sent_back() -> None:
    async with _client() as client:
        response = await client.get("/whoami")

    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == [response.json()["request_id"]]
    assert GENERATED.match(response.json()["request_id"])


async def test_each_request_gets_its_own_id() -> None:
    async with _client() as client:
        first = await client.get("/whoami")
        second = await client.get("/whoami")

    assert first.json()["request_id"] != second.json()["request_id"]


@pytest.mark.parametrize("given", ["abc-123", "req_1.2:3", "A" * 128])
async def test_sane_client_id_is_used_and_not_sent_twice(given: str) -> None:
    async with _client() as client:
        response = await client.get("/whoami", headers={"X-Request-ID": given})

    assert response.json()["request_id"] == given
    # Serve's proxy echoes the client's header; a second one would duplicate it.
    assert response.headers.get_list("x-request-id") == []


@pytest.mark.parametrize("given", ["has spaces", "A" * 200, "a/b", ""])
async def test_insane_client_id_is_replaced(given: str) -> None:
    async with _client() as client:
        response = await client.get("/whoami", headers={"x-request-id": given})

    seen = response.json()["request_id"]
    assert seen != given
    assert GENERATED.match(seen)
