"""gateway/http/origin.py: a browser page of another origin cannot have a
model generate, asked or not; the gateway's own pages and clients that send
no origin are served."""

from __future__ import annotations

import pytest

from tests.unit.gateway.http.test_cors import CHAT, SECRET, client_for


@pytest.mark.parametrize("key", [True, False])
async def test_a_page_of_another_origin_cannot_have_a_model_generate_without_asking(key: bool) -> None:
    """A "simple" request (text/plain, no preflight) from a page of another
    origin: its answer would be withheld from the page, but the model would
    have generated it. With no keys configured, any page a user opens could."""
    async with await client_for(None, keys=key) as client:
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
        headers = {"origin": "https://evil.example.net", "content-type": "text/plain"}
        if key:
            headers["authorization"] = f"Bearer {SECRET}"
        sent = await client.post(CHAT, content=body, headers=headers)
        assert sent.status_code == 403 and "evil.example.net" in sent.json()["error"]["message"]
        messages = await client.post("/v1/messages", content=body, headers=headers)
        assert messages.status_code == 403 and messages.json()["error"]["type"] == "permission_error"


@pytest.mark.parametrize(
    ("origin", "host"),
    [("http://127.0.0.1:8000", "127.0.0.1:8000"), ("https://gateway", "gateway"), ("http://[::1]:8000", "[::1]:8000")],
)
async def test_the_gateways_own_pages_and_clients_without_an_origin_are_served(origin: str, host: str) -> None:
    async with await client_for(None) as client:
        auth = {"authorization": f"Bearer {SECRET}"}
        own = await client.post(CHAT, json={"model": "m"}, headers={**auth, "origin": origin, "host": host})
        assert own.status_code == 200  # /docs' "Try it out" sends its own origin
        sdk = await client.post(CHAT, json={"model": "m"}, headers=auth)
        assert sdk.status_code == 200
        health = await client.get("/health", headers={"origin": "https://evil.example.net"})
        assert health.status_code == 200  # not a model route
