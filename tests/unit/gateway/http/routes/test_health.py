"""gateway/http/routes/health.py: the probes, ``vllm serve``'s own among them."""

from __future__ import annotations

import importlib.metadata

from gateway.auth.keys import hash_secret
from tests.unit.gateway.http.routes.test_v2 import API, OPS, Statuses, _bearer, _client, gateway_app


async def test_vllm_serves_probes_answer_as_they_do_there() -> None:
    # Tools and SageMaker-style probes pointed at `vllm serve` ask these.
    async with _client(gateway_app(Statuses())) as client:
        for method in ("GET", "POST"):
            ping = await client.request(method, "/ping")
            assert (ping.status_code, ping.json()) == (200, {"status": "ok"}), method
        version = await client.get("/version")
        assert version.status_code == 200
        assert version.json() == {"version": importlib.metadata.version("llm-gateway")}


async def test_with_an_operations_key_the_probes_want_one() -> None:
    keys = [{"id": "team", "hash": hash_secret(API)}, {"id": "prometheus", "hash": hash_secret(OPS), "ops": True}]
    async with _client(gateway_app(Statuses(), keys)) as client:
        for path in ("/ping", "/version"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers=_bearer(API))).status_code == 401, path
            assert (await client.get(path, headers=_bearer(OPS))).status_code == 200, path


async def test_ready_while_serves_controller_does_not_answer_is_not_ready_not_a_500() -> None:
    from gateway.http.state import GatewayState

    async def unreachable(self: object, apps: object) -> dict[str, str]:
        raise ConnectionError("the controller is restarting")  # as Ray's errors reaching it

    app = gateway_app(Statuses())
    state: GatewayState = app.state.gateway
    del state.deployment_statuses  # (the stand-in: Serve's own question is asked here)
    state._serve_statuses.of = unreachable.__get__(state._serve_statuses)  # type: ignore[method-assign]
    async with _client(app) as client:
        for path in ("/ready", "/v2/health/ready"):
            answer = await client.get(path)
            assert answer.status_code == 503, (path, answer.text)
        assert (await client.get("/ready")).json()["deployments"] == {"ServeController": "UNAVAILABLE"}
