"""models/llm/one_node.py: a one-node engine's workers meet through a file
and talk over loopback; vLLM itself runs the plugin that sees to it."""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import queue
import time
from pathlib import Path
from typing import Any

import pytest

from models.llm import one_node


def test_the_plugin_swaps_the_worker_class_only_for_a_one_node_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.executor import ray_executor, ray_executor_v2

    from models.llm.one_node_worker import OneNodeWorkerProc

    original = ray_executor_v2.RayWorkerProc
    monkeypatch.setattr(ray_executor_v2, "RayWorkerProc", original)  # put back after the test
    monkeypatch.setattr(ray_executor, "get_distributed_init_method", ray_executor.get_distributed_init_method)
    monkeypatch.delenv(one_node.ONE_NODE, raising=False)
    one_node.register()
    assert ray_executor_v2.RayWorkerProc is original  # any other vLLM in this environment is left alone
    monkeypatch.setenv(one_node.ONE_NODE, "1")
    one_node.register()
    one_node.register()  # vLLM may load plugins more than once in a process
    assert ray_executor_v2.RayWorkerProc is OneNodeWorkerProc
    assert issubclass(OneNodeWorkerProc, original)
    assert OneNodeWorkerProc.create_dist_init_method(None).startswith("file://")  # type: ignore[arg-type]
    # vLLM's older executor: its one-node rendezvous (on loopback) is a file, a cluster's stays TCP.
    rendezvous = ray_executor.get_distributed_init_method
    assert rendezvous("127.0.0.1", 1234).startswith("file://") and rendezvous("::1", 1234).startswith("file://")
    assert rendezvous("192.0.2.9", 1234) == "tcp://192.0.2.9:1234"
    assert rendezvous.__wrapped__.__module__ == "vllm.utils.network_utils"  # wrapped once, however often loaded


def test_the_entry_point_is_where_vllm_looks_for_general_plugins() -> None:
    import tomllib

    from vllm.plugins import DEFAULT_PLUGINS_GROUP

    project = tomllib.loads((Path(__file__).resolve().parents[4] / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][DEFAULT_PLUGINS_GROUP] == {"llm_gateway_one_node": "models.llm.one_node:register"}


def test_a_replica_says_when_its_engines_rendezvous_would_listen_on_a_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.executor import ray_executor, ray_executor_v2

    monkeypatch.setattr(ray_executor_v2, "RayWorkerProc", ray_executor_v2.RayWorkerProc)
    monkeypatch.setattr(ray_executor, "get_distributed_init_method", ray_executor.get_distributed_init_method)
    monkeypatch.delenv(one_node.ONE_NODE, raising=False)
    assert one_node.unguarded() is None  # not a one-node engine: nothing to say
    monkeypatch.setenv(one_node.ONE_NODE, "1")
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")  # an operator's list without the gateway's
    monkeypatch.setattr("vllm.plugins.plugins_loaded", False)
    reason = one_node.unguarded()
    assert reason is not None and "llm_gateway_one_node" in reason and "VLLM_PLUGINS" in reason
    monkeypatch.delenv("VLLM_PLUGINS")
    monkeypatch.setattr("vllm.plugins.plugins_loaded", False)
    assert one_node.unguarded() is None  # vLLM ran the plugin


def test_rocm_aiters_all_reduce_keeps_the_tcp_rendezvous_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.executor.ray_executor_v2 import RayWorkerProc

    from models.llm import one_node_worker

    monkeypatch.setattr(one_node_worker, "aiter_requires_tcp_store", lambda: True)
    monkeypatch.setattr(RayWorkerProc, "create_dist_init_method", lambda self: "tcp://127.0.0.1:1")
    worker = object.__new__(one_node_worker.OneNodeWorkerProc)  # (a worker's own set-up needs an engine)
    assert worker.create_dist_init_method() == "tcp://127.0.0.1:1"
    rendezvous = one_node_worker.loopback_by_file(lambda ip, port: f"tcp://{ip}:{port}")
    assert rendezvous("127.0.0.1", 2) == "tcp://127.0.0.1:2"


def _rank(rank: int, uris: Any, results: Any) -> None:
    """One engine worker: the plugin loaded as vLLM loads it, the rendezvous
    its executor's worker class makes (rank 0 makes it, as vLLM's first
    worker does), vLLM's own process-group set-up, one all-reduce."""
    import psutil
    import torch
    import torch.distributed as dist
    from vllm.distributed.parallel_state import init_distributed_environment
    from vllm.plugins import load_general_plugins
    from vllm.v1.executor import ray_executor_v2

    load_general_plugins()
    worker_class = ray_executor_v2.RayWorkerProc
    if rank == 0:
        uri = worker_class.create_dist_init_method(None)
        uris.put(uri)
    else:
        uri = uris.get(timeout=120)
    init_distributed_environment(world_size=2, rank=rank, distributed_init_method=uri, local_rank=rank, backend="gloo")
    total = torch.ones(1)
    dist.all_reduce(total)
    listening = [c.laddr.ip for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    results.put((rank, f"{worker_class.__module__}.{worker_class.__qualname__}", uri, listening, total.item()))
    dist.barrier()  # neither leaves while the other still reads its sockets


def _results(results: Any, ranks: list[Any], wait_s: float = 240) -> list[Any]:
    """Each rank's result; fails as soon as a rank ends without one."""
    found: list[Any] = []
    deadline = time.monotonic() + wait_s
    while len(found) < len(ranks) and time.monotonic() < deadline:
        try:
            found.append(results.get(timeout=0.5))
        except queue.Empty:
            failed = [p.exitcode for p in ranks if p.exitcode not in (None, 0)]
            assert not failed, f"a rank failed (exit codes {failed}); its error is in the output above"
    assert len(found) == len(ranks), f"only {len(found)} of {len(ranks)} ranks answered in {wait_s} s"
    return found


def test_a_one_node_engines_workers_meet_and_listen_on_loopback_only() -> None:
    context = multiprocessing.get_context("spawn")
    uris, results = context.Queue(), context.Queue()
    saved = dict(os.environ)
    os.environ.update(one_node.environment())  # the replica's runtime environment, as its engine inherits it
    try:
        ranks = [context.Process(target=_rank, args=(rank, uris, results)) for rank in range(2)]
        for process in ranks:
            process.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        seen = sorted(_results(results, ranks))
    finally:
        for process in ranks:
            process.join(60)
            if process.is_alive():
                process.kill()
    for uri in {uri for _, _, uri, _, _ in seen if uri.startswith("file://")}:
        Path(uri.removeprefix("file://")).unlink(missing_ok=True)  # (the store's file, once both ranks have left)
    assert [process.exitcode for process in ranks] == [0, 0]
    for rank, worker_class, uri, listening, total in seen:
        assert worker_class == "models.llm.one_node_worker.OneNodeWorkerProc"  # vLLM ran the plugin
        assert uri.startswith("file://") and total == 2.0
        assert listening, "Gloo's pairs listen somewhere"
        assert all(ipaddress.ip_address(ip).is_loopback for ip in listening), (rank, listening)
