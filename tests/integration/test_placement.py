"""Placement on the session's (single-node, CPU-only) cluster: a multi-worker
replica gets its STRICT_PACK placement group; one that fits no node fails fast;
vLLM's engine core is measured beside its worker under load where vLLM left
one CPU to the rest."""

from __future__ import annotations

import asyncio
import copy
import time

import httpx
import psutil
import pytest

from tests.integration.conftest import APP, TEST_CONFIG, VLLM_MODEL, Gateway
from tests.integration.test_faults import CHAT, HELLO, serving_engine_core

TP_ECHO = {
    "name": "echo-tp",
    "engine": "echo",
    "tensor_parallel_size": 2,
    "gpus_per_worker": 0,
    "cpus_per_worker": 0.05,
    "num_cpus": 0.05,
}


def test_multi_worker_replica_runs_in_its_strict_pack_placement_group(gateway: Gateway, http: httpx.Client) -> None:
    import ray

    config = copy.deepcopy(TEST_CONFIG)
    config["models"].append(TP_ECHO)
    gateway.redeploy(config)
    try:
        answer = http.post("/v1/completions", json={"model": "echo-tp", "prompt": "a b", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        groups = [
            g for g in ray.util.placement_group_table().values()
            if g["state"] == "CREATED" and "echo-tp" in g["name"]
        ]
        assert len(groups) == 1, groups
        assert groups[0]["strategy"] == "STRICT_PACK"
        assert list(groups[0]["bundles"].values()) == [{"CPU": 0.1}, {"CPU": 0.05}]

        from gateway import status

        found = status.collect(APP)
        deployment = found["applications"][f"{APP}:echo-tp"]["deployments"]["LLMServer:echo-tp"]
        assert deployment["placement_strategy"] == "STRICT_PACK"
        assert deployment["bundles"] == [{"CPU": 0.1}, {"CPU": 0.05}]
        (replica,) = deployment["replicas"]
        assert replica["state"] == "RUNNING"
        assert replica["bundle_nodes"] == [replica["node_id"]] * 2  # both bundles on the replica's node
        assert set(found["applications"]) >= {APP, f"{APP}:echo", f"{APP}:iris"}
        text = status.render(found)
        assert "LLMServer:echo-tp  [HEALTHY]  STRICT_PACK [{CPU: 0.1}, {CPU: 0.05}]" in text
    finally:
        gateway.redeploy(TEST_CONFIG)


def test_a_replica_that_fits_no_node_fails_within_seconds(gateway: Gateway, http: httpx.Client) -> None:
    from gateway.config import ConfigError

    config = copy.deepcopy(TEST_CONFIG)
    config["models"].append({"name": "huge", "engine": "echo", "tensor_parallel_size": 8})
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        gateway.redeploy(config)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith("models[huge]: a replica needs bundles [{CPU: 1.5, GPU: 1}")
    assert "placed STRICT_PACK ({CPU: 8.5, GPU: 8} in all)" in message
    assert "the largest node has {CPU: 4}" in message
    # Nothing was submitted: the gateway serves as before.
    assert http.post("/v1/completions", json={"model": "echo", "prompt": "a", "max_tokens": 1}).status_code == 200


async def test_the_engine_core_is_measured_beside_its_workers_while_several_requests_generate(
    gateway: Gateway,
) -> None:
    """The session's vLLM model (``engine_core_cpus`` left at ``auto``): on a
    CPU host where vLLM's workers are bound to all of the replica's CPUs but
    one, every thread of its engine core runs on the workers' CPUs for some of
    the time three streams generate (it measures there, at the latest one
    window in ``PROBE_EVERY``), and where vLLM left it (the replica's CPUs)
    before and after; elsewhere always there."""
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as session:
        replica_pid, core = await serving_engine_core(session)
        workers = core.children()
        assert len(workers) == 1, workers  # one worker: the session's model is not tensor parallel
        computing = set().union(*(set(psutil.Process(t.id).cpu_affinity()) for t in workers[0].threads()))
        replicas = set(psutil.Process(replica_pid).cpu_affinity())
        busy = computing if len(replicas - computing) == 1 else replicas

        def placed() -> set[frozenset[int]]:
            return {frozenset(psutil.Process(t.id).cpu_affinity()) for t in core.threads()}

        assert placed() == {frozenset(replicas)}  # its one request has ended
        body = {"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 300, "stream": True, "ignore_eos": True}

        async def stream() -> None:
            async with session.stream("POST", CHAT, json=body) as answer:
                assert answer.status_code == 200
                async for _ in answer.aiter_lines():
                    pass

        seen: set[frozenset[int]] = set()
        deadline = time.monotonic() + 60
        while frozenset(busy) not in seen:
            assert time.monotonic() < deadline, seen
            streams = asyncio.gather(*(stream() for _ in range(3)))
            while not streams.done():
                seen |= placed()
                await asyncio.sleep(0.02)
            await streams
        deadline = time.monotonic() + 30
        while placed() != {frozenset(replicas)}:
            assert time.monotonic() < deadline, placed()
            await asyncio.sleep(0.1)
        answer = await session.post(CHAT, json={"model": VLLM_MODEL, "messages": HELLO, "max_tokens": 2})
        assert answer.status_code == 200 and placed() == {frozenset(replicas)}
