"""gateway/affinity.py: the gateway's processes leave the engine's cores alone."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from gateway import affinity

ALL = set(range(os.cpu_count() or 1))


@pytest.mark.parametrize(
    ("setting", "cpus", "env", "expected"),
    [
        ("off", {0, 1, 2, 3}, None, None),
        ([1], {0, 1, 2, 3}, None, {1}),
        ("auto", {0, 1, 2, 3}, None, {3}),
        ("auto", {0, 1, 2, 3}, "2", {2, 3}),
        ("auto", {0, 1}, "4", {1}),  # never every CPU
        ("auto", {5}, None, None),  # one CPU: nothing to keep apart
    ],
)
def test_reserved_cpus_follow_vllms_reservation(
    monkeypatch: pytest.MonkeyPatch, setting: object, cpus: set[int], env: str | None, expected: set[int] | None
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
    monkeypatch.setattr(affinity, "_has_gpu", lambda: False)
    if env is None:
        monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", env)
    assert affinity.reserved_cpus(setting) == expected  # type: ignore[arg-type]


def test_nothing_is_reserved_on_a_gpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(affinity, "_has_gpu", lambda: True)
    assert affinity.reserved_cpus("auto") is None


def wait_for_children(root: int) -> list[int]:
    """The tree's processes, once its two children run (one named as vLLM's engine)."""
    deadline = time.monotonic() + 5
    while True:
        pids = affinity.process_tree(root)
        if len(pids) == 3 and any(affinity.is_engine(p) for p in pids):
            return pids
        assert time.monotonic() < deadline, "the children did not start"
        time.sleep(0.02)


def test_gateway_processes_are_pinned_and_the_engines_are_not() -> None:
    target = {min(os.sched_getaffinity(0))}
    tree = subprocess.Popen(
        ["bash", "-c", 'sleep 30 & (exec -a "$MARK" sleep 30) & wait'],
        env={**os.environ, "MARK": "VLLM::EngineCore"},
        start_new_session=True,
    )
    try:
        pids = wait_for_children(tree.pid)
        engine = [p for p in pids if affinity.is_engine(p)]
        assert len(engine) == 1
        assert affinity.pin_gateway_processes(tree.pid, target) == 2
        assert {p: os.sched_getaffinity(p) == target for p in pids} == {p: p not in engine for p in pids}
        assert affinity.pin_gateway_processes(tree.pid, target) == 0  # already pinned
    finally:
        os.killpg(tree.pid, 9)
        tree.wait()


def test_a_model_replica_unpins_itself() -> None:
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        affinity.unpin_self()
        assert os.sched_getaffinity(0) == ALL
    finally:
        os.sched_setaffinity(0, before)
