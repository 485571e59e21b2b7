"""One Ray cluster and one deployed gateway for the whole test session.

The app serves the real vLLM engine on the locally built tiny model, the echo
engine, and a deliberately narrow echo deployment for backpressure tests.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / ".models" / "tiny-chat-v1"
APP = "llm-gateway-test"
VLLM_MODEL = "tiny-chat-v1"
VLLM_CONTEXT = 512
ECHO_CONTEXT = 256

TEST_CONFIG: dict[str, Any] = {
    "app_name": APP,
    "ingress": {"num_cpus": 0.1},
    "models": [
        {
            "name": VLLM_MODEL,
            "engine": "vllm",
            "model": str(MODEL_DIR),
            "max_model_len": VLLM_CONTEXT,
            "kv_cache_space_gib": 1,
            "tool_call_parser": "hermes",
            "num_cpus": 0.1,
        },
        {"name": "echo", "engine": "echo", "max_model_len": ECHO_CONTEXT, "num_cpus": 0.1},
        {"name": "echo-b", "engine": "echo", "max_model_len": ECHO_CONTEXT, "num_cpus": 0.1},
        {
            "name": "echo-narrow",
            "engine": "echo",
            "num_cpus": 0.1,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
            "echo_token_delay_ms": 100,
        },
    ],
    "routing": {
        "routes": [
            {"name": "chat", "variants": {"echo": 80, "echo-b": 20}},
            {"name": "vllm-alias", "variants": {VLLM_MODEL: 1, "echo": 0}},
            {"name": "fb", "variants": {"echo-narrow": 9, "echo": 1}, "fallback": True},
            {"name": "mirrored", "variants": {"echo": 1}, "shadow": {"variant": "echo-b", "percent": 100}},
        ]
    },
}


@dataclass(frozen=True)
class Gateway:
    base_url: str  # http://127.0.0.1:PORT
    config_path: Path

    def redeploy(self, config: dict[str, Any]) -> None:
        """Rewrites the config file in place and applies it, as an operator would."""
        from gateway.config import parse_config
        from gateway.deploy import deploy

        self.config_path.write_text(yaml.safe_dump(config))
        deploy(parse_config(config), self.config_path, ROOT)

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def handle(self, model: str) -> Any:
        from ray import serve

        from gateway.app import deployment_name
        from gateway.config import ModelConfig

        name = deployment_name(ModelConfig(name=model, engine="echo"))
        return serve.get_deployment_handle(name, app_name=APP)

    async def unfinished_requests(self, model: str) -> int:
        handle = self.handle(model).options(method_name="num_unfinished_requests")
        return int(await handle.remote())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if not (MODEL_DIR / "model.safetensors").is_file():
        pytest.fail(f"{MODEL_DIR} is missing: run `make models` (make test does it)")
    from gateway.config import parse_config

    # The same Ray runtime `llm-gateway serve` starts (HAProxy ingress,
    # throughput mode), set before Ray is imported: it reads them at import.
    os.environ.update(parse_config(TEST_CONFIG).runtime.environment())
    import ray
    from ray import serve


    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    gateway = Gateway(f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("config") / "gateway.yaml")
    gateway.redeploy(TEST_CONFIG)
    _wait_ready(gateway.base_url)
    try:
        yield gateway
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_ready(base_url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail("gateway did not become ready")


@pytest.fixture(scope="session")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def async_client(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base_url, timeout=60) as session:
        yield session
