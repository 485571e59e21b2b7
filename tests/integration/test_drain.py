"""Streams in flight finish when their replica stops: scaled down or replaced.

A model with two replicas serves steady streaming traffic while it is
scaled down to one and then replaced by a changed config (new replicas,
the old ones stopped). A stopping replica takes no new streams (the
ingress opens them on another) and lets its own finish, within the
model's ``graceful_shutdown_s``: no stream fails or is cut short.
"""

from __future__ import annotations

import asyncio
import copy

import httpx

from tests.integration.conftest import TEST_CONFIG, Gateway, replica_pids

MODEL = "echo-drain"
DRAIN = {"name": MODEL, "engine": "echo", "num_cpus": 0.1, "num_replicas": 2, "echo_token_delay_ms": 25}
WORDS = 60  # one token per word: streams of about 1.5 s
PROMPT = " ".join(f"w{i}" for i in range(WORDS))


async def until(condition, timeout_s: float = 60) -> None:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_streams_in_flight_finish_when_replicas_are_scaled_down_or_replaced(gateway: Gateway) -> None:
    two = copy.deepcopy(TEST_CONFIG)
    two["models"].append(DRAIN)
    one = copy.deepcopy(two)
    one["models"][-1] = {**DRAIN, "num_replicas": 1}
    changed = copy.deepcopy(two)
    changed["models"][-1] = {**DRAIN, "echo_token_delay_ms": 20}  # not live: new replicas
    stop = asyncio.Event()
    finished: list[int] = []
    failures: list[str] = []

    async def client(session: httpx.AsyncClient) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
                "stream_options": {"include_usage": True}}
        while not stop.is_set():
            try:
                async with session.stream("POST", "/v1/chat/completions", json=body) as response:
                    lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
                if response.status_code != 200 or lines[-1] != "data: [DONE]" or '"error"' in "".join(lines):
                    failures.append(f"{response.status_code}: {lines[-3:]}")
                elif f'"completion_tokens":{WORDS}' not in lines[-2].replace(" ", ""):
                    failures.append(f"cut short: {lines[-2]}")
                else:
                    finished.append(1)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    try:
        await asyncio.to_thread(gateway.redeploy, two)
        await until(lambda: len(replica_pids(MODEL)) == 2)
        first = replica_pids(MODEL)
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:
            traffic = [asyncio.ensure_future(client(session)) for _ in range(6)]
            await until(lambda: len(finished) >= 6)

            await asyncio.to_thread(gateway.redeploy, one)  # scaled down: one replica stops
            await until(lambda: len(replica_pids(MODEL)) == 1)
            left = replica_pids(MODEL)
            done = len(finished)
            await until(lambda: len(finished) >= done + 6)

            await asyncio.to_thread(gateway.redeploy, changed)  # replaced: the old replica stops
            await until(lambda: not (replica_pids(MODEL) & left) and len(replica_pids(MODEL)) == 2)
            done = len(finished)
            await until(lambda: len(finished) >= done + 6)
            stop.set()
            await asyncio.gather(*traffic)
        assert left < first and not (replica_pids(MODEL) & first)
        assert failures == [], failures
        assert len(finished) >= 18
    finally:
        stop.set()
        await asyncio.to_thread(gateway.redeploy, TEST_CONFIG)
