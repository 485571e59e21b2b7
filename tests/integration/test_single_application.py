"""The single-application form (`serve run gateway.app:app_builder`): the ingress
bound to its model deployments, beside the per-model form the session runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import MODELS, Gateway

SINGLE = {
    "app_name": "single",
    "ingress": {"num_cpus": 0.05},
    "models": [
        {"name": "s-echo", "engine": "echo", "num_cpus": 0.05},
        {"name": "s-iris", "engine": "sklearn", "model": str(MODELS / "iris"), "num_cpus": 0.05},
    ],
    "routing": {"routes": [{"name": "s-chat", "variants": {"s-echo": 1}}]},
}


@pytest.fixture(scope="module")
def single(gateway: Gateway) -> Iterator[httpx.Client]:
    from ray import serve

    from gateway.app import app_builder

    serve.run(app_builder({"config": SINGLE}), name="single", route_prefix="/single")
    try:
        with httpx.Client(base_url=gateway.base_url + "/single", timeout=60) as session:
            yield session
    finally:
        serve.delete("single")


def test_routes_reach_bound_model_deployments(single: httpx.Client) -> None:
    chat: dict[str, Any] = {"model": "s-chat", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 2}
    answer = single.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "s-echo"
    predicted = single.post("/v1/models/s-iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
    assert predicted.json()["predictions"][0]["label"] == "setosa"


def test_ready_covers_the_applications_own_deployments(single: httpx.Client) -> None:
    ready = single.get("/ready")
    assert ready.status_code == 200
    assert set(ready.json()["deployments"]) == {"GatewayIngress", "MetricsHub", "LLMServer:s-echo", "ClassicalServer:s-iris"}
