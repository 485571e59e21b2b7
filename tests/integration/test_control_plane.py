"""Serve's controller restarting (Ray restarts it after a crash) costs the
gateway's users nothing: every replica and engine is kept, and the models
answer throughout. The keys' ledger restarting (its hub's replica replaced)
forgets no request still running.

The restarted controller recovers the replicas it finds and asks each where
it logs; a vLLM replica whose engine start had closed Serve's log handlers
failed that, was stopped, and its model answered 503 until a new engine was
up (``models.log_handlers``).
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import httpx
import psutil
import pytest

from gateway.auth.keys import hash_secret, new_secret
from tests.integration.conftest import APP, TEST_CONFIG, VLLM_MODEL, Gateway
from tests.integration.test_routing import replica_processes

RECOVERY_LIMIT_S = 120
MODELS = (VLLM_MODEL, "echo", "minilm", "iris")


def _controller_pids() -> set[int]:
    return {
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if "ray::ServeController" in " ".join(p.info["cmdline"] or [])
    }


def _all_running() -> bool:
    """Whether the controller answers and every replica of every deployment is
    RUNNING (recovered ones included; one it stopped would be starting)."""
    from ray import serve

    try:
        applications = serve.status().applications
    except Exception:  # noqa: BLE001 - the controller is not back yet
        return False
    states = [
        state
        for app in applications.values()
        for deployment in app.deployments.values()
        for state, count in deployment.replica_states.items()
        if count
    ]
    return bool(states) and all(str(state).endswith("RUNNING") for state in states)


async def _requests_until(stop: asyncio.Event, http: httpx.AsyncClient, answers: list[tuple[str, int]]) -> None:
    """Streams from the vLLM model and embeddings from MiniLM, one after another, until ``stop``."""
    while not stop.is_set():
        async with http.stream("POST", "/v1/chat/completions", json={
            "model": VLLM_MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "stream": True,
        }) as response:
            text = (await response.aread()).decode()
            answers.append(("chat", response.status_code if "data: [DONE]" in text else -1))
        response = await http.post("/v1/embeddings", json={"model": "minilm", "input": "hello"})
        answers.append(("embeddings", response.status_code))


async def _answered(answers: list[tuple[str, int]], count: int) -> None:
    deadline = time.monotonic() + 60
    while len(answers) < count:
        assert time.monotonic() < deadline, f"no answers: {answers}"
        await asyncio.sleep(0.05)


async def test_a_restarted_serve_controller_keeps_every_replica_and_the_models_answer_throughout(
    gateway: Gateway,
) -> None:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    before = {model: replica_processes(model) for model in MODELS}
    old = _controller_pids()
    assert old, "no Serve controller process"
    stop = asyncio.Event()
    answers: list[tuple[str, int]] = []
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http:
        load = asyncio.create_task(_requests_until(stop, http, answers))
        await _answered(answers, 2)
        ray.kill(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE), no_restart=False)
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        # Asked from a thread: the call waits while the controller restarts, the load goes on meanwhile.
        while not (bool(_controller_pids() - old) and await asyncio.to_thread(_all_running)):
            assert time.monotonic() < deadline, f"Serve's controller did not recover: {_controller_pids()}"
            await asyncio.sleep(0.5)
        await _answered(answers, len(answers) + 4)  # and served after recovery
        stop.set()
        await load

    after = {model: replica_processes(model) for model in MODELS}
    assert after == before, "a replica was restarted"
    failed = Counter(answer for answer in answers if answer[1] != 200)
    assert not failed, f"answers other than 200 while the controller restarted: {failed}"
    assert {kind for kind, _ in answers} == {"chat", "embeddings"}


@pytest.fixture
def one_place(gateway: Gateway) -> Iterator[str]:
    """A key of one concurrent request, and a model whose answers take seconds."""
    secret = new_secret()
    keyed = copy.deepcopy(TEST_CONFIG)
    keyed["keys"] = [{"id": "one-place", "hash": hash_secret(secret), "max_concurrent": 1}]
    keyed["models"].append({"name": "echo-slow", "engine": "echo", "num_cpus": 0.1, "echo_token_delay_ms": 100})
    gateway.redeploy(keyed)
    try:
        yield secret
    finally:
        gateway.redeploy(TEST_CONFIG)


async def _next_event(lines: AsyncIterator[str]) -> str | None:
    async for line in lines:
        if line:
            return line
    return None


def _hub_pids() -> set[int]:
    title = re.compile(rf"ServeReplica:{re.escape(APP)}:MetricsHub(\.\w+)?(\s|$)")
    return {p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if title.search(" ".join(p.info["cmdline"] or []))}


async def test_a_restarted_keys_ledger_is_told_of_the_requests_still_running(
    gateway: Gateway, one_place: str
) -> None:
    # The ledger is in memory, in the hub's replica; Serve replaces a hub that died with an empty one.
    words = " ".join(["word"] * 200)
    story = {"model": "echo-slow", "messages": [{"role": "user", "content": words}], "max_tokens": 200, "stream": True}
    short = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    (hub,) = _hub_pids()
    async with httpx.AsyncClient(
        base_url=gateway.base_url, timeout=60, headers={"authorization": f"Bearer {one_place}"}
    ) as http:
        async with http.stream("POST", "/v1/chat/completions", json=story) as running:  # 20 s of tokens
            lines = running.aiter_lines()
            assert await _next_event(lines)
            psutil.Process(hub).kill()
            deadline = time.monotonic() + 15
            # Limited keys are answered 503 until the new ledger is up; then it counts the running stream.
            while (key := await http.get("/v1/key")).status_code != 200 or key.json()["usage"]["in_flight"] != 1:
                assert key.status_code in (200, 503), key.text
                assert time.monotonic() < deadline, f"the running stream is not counted: {key.text}"
                await asyncio.sleep(0.1)
            assert _hub_pids() - {hub}, "the hub's replica was not replaced"
            refused = await http.post("/v1/chat/completions", json=short)
            assert refused.status_code == 429, refused.text
            assert "concurrent requests: Limit 1, Used 1" in refused.json()["error"]["message"]
            assert await _next_event(lines), "the stream ended"  # still running
        # The client left: its place is free in the new ledger.
        deadline = time.monotonic() + 15
        while (answer := await http.post("/v1/chat/completions", json=short)).status_code == 429:
            assert time.monotonic() < deadline, answer.text
            await asyncio.sleep(0.1)
        assert answer.status_code == 200, answer.text
