"""One Ray cluster and one deployed gateway for the whole test session.

The gateway serves the real vLLM engine on the locally built tiny model, the
echo engine, a deliberately narrow echo deployment for backpressure tests, two
iris classifiers and the real MiniLM embedding model.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from gateway import local_cluster
from gateway.config import parse_config
from gateway.http.front_door_socket import KEEPER_VARIABLE, SocketKeeper

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / ".models"
MODEL_DIR = MODELS / "tiny-chat-v1"
APP = "llm-gateway-test"
VLLM_MODEL = "tiny-chat-v1"
VLLM_CONTEXT = 512
LORA = "tiny-lora"  # a LoRA adapter of VLLM_MODEL, served by its replicas
ECHO_CONTEXT = 256
# Every ingress replica appends its JSON access and error lines here.
ACCESS_LOG = Path(tempfile.mkdtemp(prefix="llm-gateway-test-")) / "access.log"
INGRESS_REPLICAS = 2
# The one origin whose browser pages may call the test gateway.
BROWSER_PAGE = "https://chat.example.com"

TEST_CONFIG: dict[str, Any] = {
    "app_name": APP,
    # Two ingress replicas: every test goes through either, and /metrics must
    # show the sum of both.
    "ingress": {
        "num_cpus": 0.1,
        "num_replicas": INGRESS_REPLICAS,
        "access_log": str(ACCESS_LOG),
        "read_timeout_s": 5,
        "replica_wait_s": 2,  # test_faults
        "cors": {"allow_origins": [BROWSER_PAGE]},  # test_streaming
    },
    "models": [
        {
            "name": VLLM_MODEL,
            "engine": "vllm",
            "model": str(MODEL_DIR),
            "max_model_len": VLLM_CONTEXT,
            "kv_cache_space_gib": 1,
            "tool_call_parser": "hermes",
            "num_cpus": 0.1,
            "lora_adapters": {LORA: str(MODELS / "tiny-chat-v1-lora")},
        },
        # The `chat` alias's variants run two replicas each: a stored response's
        # follow-ups must find the one replica that keeps it (test_responses).
        {"name": "echo", "engine": "echo", "max_model_len": ECHO_CONTEXT, "num_cpus": 0.1, "num_replicas": 2},
        {"name": "echo-b", "engine": "echo", "max_model_len": ECHO_CONTEXT, "num_cpus": 0.1, "num_replicas": 2},
        {"name": "echo-copy", "engine": "echo", "num_cpus": 0.1},  # shadow copies, counted on its one replica
        {
            "name": "echo-narrow",
            "engine": "echo",
            "num_cpus": 0.1,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
            "echo_token_delay_ms": 100,
            "request_timeout_s": 3,  # test_timeouts
        },
        {"name": "iris", "engine": "sklearn", "model": str(MODELS / "iris"), "num_cpus": 0.1,
         "batch_wait_timeout_s": 0.02, "max_instances_per_request": 200},
        {"name": "iris-tree", "engine": "sklearn", "model": str(MODELS / "iris-tree"), "num_cpus": 0.1},
        {"name": "minilm", "engine": "sentence-transformers", "model": str(MODELS / "all-minilm-l6-v2"),
         "num_cpus": 0.1, "batch_wait_timeout_s": 0.02, "max_instances_per_request": 64},
    ],
    "routing": {
        "seed": 20261130,  # the weighted splits the tests count are the same each run
        "routes": [
            {"name": "chat", "variants": {"echo": 80, "echo-b": 20}},
            {"name": "vllm-alias", "variants": {VLLM_MODEL: 1, "echo": 0}},
            {"name": "fb", "variants": {"echo-narrow": 9, "echo": 1}, "fallback": True},
            {"name": "mirrored", "variants": {"echo": 1}, "shadow": {"variant": "echo-copy", "percent": 100}},
            {"name": "iris-ab", "variants": {"iris": 50, "iris-tree": 50}},
            {"name": "embed", "variants": {"minilm": 1}},
            {"name": "lora-ab", "variants": {VLLM_MODEL: 1, LORA: 1}},
            {"name": "vllm-fb", "variants": {VLLM_MODEL: 1000, "echo": 1}, "fallback": True},  # test_faults
        ]
    },
}

# The Ray runtime `llm-gateway serve` starts (its own front door, throughput
# mode, a single-machine cluster on loopback). Ray reads these when it is
# imported, in this process too, and test modules import Ray as they are
# collected: so they are set here, when pytest loads this file, first.
assert "ray" not in sys.modules, "Ray was imported before the test runtime was set"
_parsed = parse_config(TEST_CONFIG)
_LOCAL = local_cluster.environment(_parsed.runtime, _parsed.ingress.read_timeout_s)
os.environ.update(_LOCAL)


def pytest_unconfigure(config: pytest.Config) -> None:
    local_cluster.remove_local_files(_LOCAL)  # the cluster has stopped by now


@dataclass
class Gateway:
    base_url: str  # http://127.0.0.1:PORT
    config: dict[str, Any]

    def redeploy(self, config: dict[str, Any]) -> dict[str, str]:
        """Applies a changed config, as `llm-gateway deploy` does; what it did to each model changed."""
        from gateway.config import parse_config
        from gateway.deploy import deploy

        changed = deploy(parse_config(config, base_dir=ROOT))
        self.config = config
        return changed

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def call(self, model: str, method: str) -> Any:
        """Calls ``method`` on ``model``'s replica, as the ingress would.

        Synchronous on purpose (run it with asyncio.to_thread from async
        tests): the handle routes on a loop of its own, not on a test's event
        loop that closes before the session ends.
        """
        from ray.serve.handle import DeploymentHandle

        from gateway.config import parse_model
        from gateway.deploy import deployment_name, model_app_name

        entry = next(m for m in self.config["models"] if m["name"] == model)
        name = deployment_name(parse_model(entry))
        handle = DeploymentHandle(name, model_app_name(APP, model))
        handle._init(_run_router_in_separate_loop=True)
        return handle.options(method_name=method).remote().result()

    async def unfinished_requests(self, model: str) -> int:
        return int(await asyncio.to_thread(self.call, model, "num_unfinished_requests"))


def replica_pids(model: str) -> set[int]:
    """The processes of ``model``'s replicas (their Ray worker's title names the deployment)."""
    title = re.compile(rf"Server:{re.escape(model)}(\.\w+)?(\s|$)")
    return {
        proc.info["pid"]
        for proc in psutil.process_iter(["pid", "cmdline"])
        if title.search(" ".join(proc.info["cmdline"] or []))
    }


def _free_port() -> int:
    """A free port outside the kernel's ephemeral range, as the gateway picks
    HAProxy's (a picked ephemeral port can be taken by the time it is bound)."""
    from gateway.local_cluster import free_port

    return free_port()


@pytest.fixture(scope="session")
def gateway() -> Iterator[Gateway]:
    if not (MODEL_DIR / "model.safetensors").is_file():
        pytest.fail(f"{MODEL_DIR} is missing: run `make models` (make test does it)")
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    # As `llm-gateway serve` does: one socket, kept here, for both ingress replicas.
    keeper = SocketKeeper("127.0.0.1", _free_port(), _LOCAL[KEEPER_VARIABLE])
    serve.start(**local_cluster.serve_options(_parsed.runtime, _LOCAL, "127.0.0.1", keeper.port))
    gateway = Gateway(f"http://127.0.0.1:{keeper.port}", TEST_CONFIG)
    gateway.redeploy(TEST_CONFIG)
    _wait_ready(gateway.base_url)
    try:
        yield gateway
    finally:
        keeper.close()
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
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=60) as sdk:
        yield sdk


@pytest.fixture(scope="session")
async def async_client(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=60)
    try:
        yield client
    finally:
        await client.close()  # its pooled connections end with the session's event loop


@pytest.fixture(scope="session")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base_url, timeout=60) as session:
        yield session
