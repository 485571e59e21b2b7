"""ingress.cors: browser pages on the origins named may call the gateway, keys
still checked; with none named, no page of another origin may."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.auth.keys import KeyTable, hash_secret, new_secret
from gateway.config import ConfigError, FrontDoorConfig, KeyConfig, parse_config
from gateway.http.api import build_api
from gateway.http.state import GatewayState

PAGE = "https://chat.example.com"
CHAT = "/v1/chat/completions"
SECRET = new_secret()
# What the OpenAI JS SDK asks to send from a browser page.
SDK_HEADERS = "authorization,content-type,x-stainless-os,x-stainless-retry-count"


async def answer(endpoint: str, request: Request, model: str | None = None) -> Response:
    return JSONResponse({"ok": True}, headers={"x-gateway-variant": "v1"})


async def client_for(
    cors: dict[str, Any] | None, keys: bool = True, allowed_hosts: list[str] | None = None
) -> httpx.AsyncClient:
    ingress: dict[str, Any] = {"cors": cors} if cors else {}
    if allowed_hosts is not None:
        ingress["allowed_hosts"] = allowed_hosts
    front_door = FrontDoorConfig.model_validate({"ingress": ingress})
    state = GatewayState(front_door, lambda model: None, lambda model: "")
    state.keys = KeyTable([KeyConfig.model_validate({"id": "team-a", "hash": hash_secret(SECRET)})] if keys else [])
    app = build_api(state)
    state.dispatcher.dispatch = answer  # type: ignore[method-assign]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


@pytest.fixture
async def named() -> AsyncIterator[httpx.AsyncClient]:
    async with await client_for({"allow_origins": [PAGE + "/"], "max_age_s": 300}) as client:
        yield client


def preflight(origin: str, method: str = "POST", headers: str = SDK_HEADERS) -> dict[str, str]:
    return {"origin": origin, "access-control-request-method": method, "access-control-request-headers": headers}


async def test_a_named_origins_preflight_is_answered_without_a_key(named: httpx.AsyncClient) -> None:
    response = await named.options(CHAT, headers=preflight(PAGE))
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == PAGE
    allowed = {h.strip() for h in response.headers["access-control-allow-headers"].split(",")}
    assert set(SDK_HEADERS.split(",")) <= allowed
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-max-age"] == "300"


async def test_its_requests_keep_the_key_check_and_every_answer_can_be_read(named: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": []}
    refused = await named.post(CHAT, json=body, headers={"origin": PAGE})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.headers["access-control-allow-origin"] == PAGE  # the page can read why
    served = await named.post(CHAT, json=body, headers={"origin": PAGE, "authorization": f"Bearer {SECRET}"})
    assert served.status_code == 200
    assert served.headers["access-control-allow-origin"] == PAGE
    assert "origin" in served.headers["vary"].lower()
    exposed = {h.strip() for h in served.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "x-gateway-variant", "retry-after", "x-ratelimit-remaining-tokens"} <= exposed


async def test_another_origin_gets_nothing_it_could_use(named: httpx.AsyncClient) -> None:
    response = await named.options(CHAT, headers=preflight("https://evil.example.net"))
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    sent = await named.post(
        CHAT, json={"model": "m", "messages": []},
        headers={"origin": "https://evil.example.net", "authorization": f"Bearer {SECRET}"},
    )
    assert "access-control-allow-origin" not in sent.headers  # the browser withholds the answer


async def test_without_cors_no_page_of_another_origin_is_let_in() -> None:
    async with await client_for(None) as client:
        response = await client.options(CHAT, headers=preflight(PAGE))
        assert "access-control-allow-origin" not in response.headers
        assert response.status_code == 403
        sent = await client.post(
            CHAT, json={"model": "m", "messages": []}, headers={"origin": PAGE, "authorization": f"Bearer {SECRET}"}
        )
        assert sent.status_code == 403 and "access-control-allow-origin" not in sent.headers
        assert sent.json()["error"]["code"] == "origin_not_allowed"


async def test_any_origin_when_asked() -> None:
    async with await client_for({"allow_origins": ["*"]}) as client:
        response = await client.options(CHAT, headers=preflight("http://localhost:3000"))
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers


def test_origins_are_checked_and_written_as_browsers_send_them() -> None:
    base: dict[str, Any] = {"models": [{"name": "e", "engine": "echo"}]}
    config = parse_config({**base, "ingress": {"cors": {"allow_origins": ["HTTPS://Chat.Example.com/"]}}})
    assert config.ingress.cors is not None and config.ingress.cors.allow_origins == [PAGE]
    for origins in (["chat.example.com"], ["https://chat.example.com/app"], [], ["ftp://x"]):
        with pytest.raises(ConfigError):
            parse_config({**base, "ingress": {"cors": {"allow_origins": origins}}})
    with pytest.raises(ConfigError, match="allow_credentials"):
        parse_config({**base, "ingress": {"cors": {"allow_origins": ["*"], "allow_credentials": True}}})


async def test_a_default_port_and_a_lower_case_method_still_let_the_page_in() -> None:
    # Browsers send `https://chat.example.com` and ask for `POST`: the page was refused every time.
    async with await client_for({"allow_origins": [PAGE + ":443"], "allow_methods": ["post"]}) as client:
        response = await client.options(CHAT, headers=preflight(PAGE))
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == PAGE
        assert "POST" in response.headers["access-control-allow-methods"]
        answer = await client.post(CHAT, json={}, headers={"origin": PAGE, "authorization": f"Bearer {SECRET}"})
        assert answer.status_code == 200
    async with await client_for({"allow_origins": ["http://chat.example.com:80", "http://chat.example.com:8080"]}) as c:
        assert (await c.options(CHAT, headers=preflight("http://chat.example.com"))).status_code == 200
        assert (await c.options(CHAT, headers=preflight("http://chat.example.com:8080"))).status_code == 200
