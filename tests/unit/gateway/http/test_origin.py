"""gateway/http/origin.py: a browser page of another origin cannot have a
model generate, asked or not; the gateway's own pages and clients that send
no origin are served; a gateway without keys serves pages only on an IP
address, localhost or a host ingress.allowed_hosts names (DNS rebinding)."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse_config
from gateway.http.origin import OriginGuard, is_loopback
from tests.unit.gateway.http.test_cors import CHAT, SECRET, client_for


@pytest.mark.parametrize("key", [True, False])
async def test_a_page_of_another_origin_cannot_have_a_model_generate_without_asking(key: bool) -> None:
    """A "simple" request (text/plain, no preflight) from a page of another
    origin: its answer would be withheld from the page, but the model would
    have generated it. With no keys configured, any page a user opens could."""
    async with await client_for(None, keys=key, allowed_hosts=["gateway"]) as client:
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



@pytest.mark.parametrize(
    ("origin", "host"),
    [("http://192.168.1.5:3000", "192.168.1.5:8000"), ("https://gateway:8443", "gateway:443"),
     ("https://gateway", "gateway:8000")],
)
async def test_a_page_of_another_port_of_the_gateways_host_is_another_origin(origin: str, host: str) -> None:
    # Another site on the same machine: with no keys, any of its visitors' browsers would have the model generate.
    async with await client_for(None, keys=False, allowed_hosts=["gateway"]) as client:
        sent = await client.post(CHAT, json={"model": "m"}, headers={"origin": origin, "host": host})
        assert sent.status_code == 403 and sent.json()["error"]["code"] == "origin_not_allowed", sent.text


@pytest.mark.parametrize(
    ("origin", "host"),
    [("https://gateway", "gateway:443"), ("http://gateway", "gateway:80"),
     ("https://gateway:8443", "gateway")],  # behind a proxy that drops the port from Host
)
async def test_a_page_on_the_port_the_host_names_or_of_a_host_named_without_one_is_the_gateways_own(
    origin: str, host: str
) -> None:
    async with await client_for(None, keys=False, allowed_hosts=["gateway"]) as client:
        sent = await client.post(CHAT, json={"model": "m"}, headers={"origin": origin, "host": host})
        assert sent.status_code == 200, sent.text


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "app.localhost", "127.0.0.2", "192.0.2.7:8000",
     "[2001:db8::7]:8000", "LOCALHOST."],
)
async def test_a_keyless_gateway_serves_its_own_pages_on_an_address_or_localhost(host: str) -> None:
    """A page of an IP address is that address's own: no site's name points there."""
    async with await client_for(None, keys=False) as client:
        page = {"host": host, "origin": f"http://{host}"}
        served = await client.post(CHAT, json={"model": "m"}, headers=page)
        assert served.status_code == 200, served.text


@pytest.mark.parametrize("host", ["evil.example.net:8000", "evil.example.net", "gpu-box.internal:8000", "127.0.0.1.nip.io"])
async def test_a_keyless_gateway_refuses_a_site_that_points_its_name_here(host: str) -> None:
    """DNS rebinding: the page's own site name now resolves to the gateway's
    address (127.0.0.1, where Docker or a tunnel publishes it, or a LAN
    address), so to the browser the gateway is that site, and the page could
    read every answer. Wherever the gateway listens."""
    async with await client_for(None, keys=False) as client:
        page = {"host": host, "origin": f"http://{host}"}
        refused = await client.post(CHAT, json={"model": "m"}, headers=page)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "host_not_allowed"
        assert "ingress.allowed_hosts" in refused.json()["error"]["message"]
        assert (await client.get("/health", headers=page)).status_code == 200  # not a model route
        # Not a browser (no Origin): an SDK, curl, a local proxy naming its own site.
        client_of_its_own = await client.post(CHAT, json={"model": "m"}, headers={"host": host})
        assert client_of_its_own.status_code == 200


@pytest.mark.parametrize(
    ("host", "served"),
    [("gateway.example.com:8000", True), ("Gateway.Example.COM.", True), ("llm.corp.example", True),
     ("a.b.corp.example:443", True), ("corp.example", False), ("evilcorp.example", False),
     ("gateway.example.com.evil.net", False), ("example.com", False)],
)
async def test_a_keyless_gateway_serves_pages_of_the_hosts_it_is_told_are_its_own(host: str, served: bool) -> None:
    async with await client_for(None, keys=False, allowed_hosts=["GATEWAY.example.com", "*.corp.example."]) as client:
        sent = await client.post(CHAT, json={"model": "m"}, headers={"host": host, "origin": f"https://{host}"})
        assert (sent.status_code == 200) is served, sent.text
    async with await client_for(None, keys=False, allowed_hosts=["*"]) as client:
        sent = await client.post(CHAT, json={"model": "m"}, headers={"host": host, "origin": f"https://{host}"})
        assert sent.status_code == 200, sent.text


async def test_a_keyless_gateway_serves_a_page_of_an_origin_cors_names_by_any_host() -> None:
    """A rebinding page sends its own site's origin: one the operator named is trusted by name."""
    async with await client_for({"allow_origins": ["https://chat.example.com"]}, keys=False) as client:
        page = {"host": "gpu-box.internal:8000", "origin": "https://chat.example.com"}
        assert (await client.post(CHAT, json={"model": "m"}, headers=page)).status_code == 200
        rebinding = {"host": "evil.example.net:8000", "origin": "http://evil.example.net:8000"}
        refused = await client.post(CHAT, json={"model": "m"}, headers=rebinding)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "host_not_allowed"


async def test_any_host_is_served_with_keys() -> None:
    """With keys a page has none to send: a site pointing its name here gains nothing."""
    async with await client_for(None, keys=True) as client:
        auth = {"authorization": f"Bearer {SECRET}"}
        page = {"host": "gpu-box.internal:8000", "origin": "http://gpu-box.internal:8000"}
        served = await client.post(CHAT, json={"model": "m"}, headers={**auth, **page})
        assert served.status_code == 200


def test_allowed_hosts_are_host_names() -> None:
    base = {"models": [{"name": "e", "engine": "echo"}]}
    for hosts in (["https://gateway.example.com"], ["gateway:8000"], ["gateway/v1"], [""], ["*.*.example"], ["a b"],
                  ["gateway.example.com\n"]):
        with pytest.raises(ConfigError, match="allowed_hosts"):
            parse_config({**base, "ingress": {"allowed_hosts": hosts}})
    config = parse_config({**base, "ingress": {"allowed_hosts": ["Gateway.Example.com.", "*.corp.example", "*"]}})
    assert config.ingress.allowed_hosts == ["gateway.example.com", "*.corp.example", "*"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost", True), ("127.0.0.1", True), ("::1", True), ("[::1]", True), ("127.8.9.1", True),
     ("Foo.LOCALHOST.", True), ("0.0.0.0", False), ("192.0.2.1", False), ("localhost.evil.net", False), ("", False)],
)
def test_loopback_hosts_are_this_machines_own(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


PAGE = [(b"host", b"evil.example.net"), (b"origin", b"http://evil.example.net")]


async def keyless_status(path: str, headers: list[tuple[bytes, bytes]], root: str = "") -> object:
    """The status a keyless gateway's origin check gives a request (200: let through to the app)."""
    sent: list[dict[str, object]] = []

    async def served(scope: object, receive: object, send: object) -> None:
        sent.append({"type": "http.response.start", "status": 200})

    async def record(message: dict[str, object]) -> None:
        sent.append(message)

    guard = OriginGuard(served, origins=[], hosts=[], keyless=lambda: True)
    scope = {"type": "http", "path": path, "root_path": root, "headers": headers}
    await guard(scope, None, record)  # type: ignore[arg-type]
    return sent[0]["status"]


async def test_a_request_without_an_origin_is_no_browsers_and_is_served_whatever_host_it_names() -> None:
    """An HTTP/1.0 client may name no host; a proxy, any: neither is a page."""
    for headers, status in (([], 200), ([(b"host", b"evil.example.net")], 200), (PAGE, 403), (PAGE[1:], 403)):
        assert await keyless_status(CHAT, headers) == status, headers


@pytest.mark.parametrize(("root", "status"), [("/v", 403), ("/api", 403), ("/v1", 200)])
async def test_a_route_prefix_that_merely_begins_a_model_path_does_not_take_it_past_the_origin_check(
    root: str, status: int
) -> None:
    # Under `/v` the routes match `/v1/chat/completions` whole; under `/v1` it is `/chat/completions`, no model route.
    path = ("/api" if root == "/api" else "") + CHAT
    assert await keyless_status(path, PAGE, root) == status
