"""Placement across simulated nodes (two nodes x 4 GPUs), through the real deploy path."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.integration.conftest import ROOT


@pytest.fixture(scope="module")
def seen() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.cluster_scenarios"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_tp4_bundles_all_land_on_one_gpu_node_strict_pack(seen: dict[str, Any]) -> None:
    (replica,) = seen["tp4"]
    assert replica["strategy"] == "STRICT_PACK"
    assert len(replica["bundle_nodes"]) == 4
    assert set(replica["bundle_nodes"]) == {replica["node"]}
    assert replica["node"] in seen["gpu_nodes"]


def test_two_tp4_replicas_take_one_node_each(seen: dict[str, Any]) -> None:
    first, second = seen["tp4x2"]
    for replica in (first, second):
        assert set(replica["bundle_nodes"]) == {replica["node"]}
    assert {first["node"], second["node"]} == set(seen["gpu_nodes"])


def test_pack_may_span_nodes_when_asked(seen: dict[str, Any]) -> None:
    (replica,) = seen["pack6"]
    assert replica["strategy"] == "PACK"
    assert set(replica["bundle_nodes"]) == set(seen["gpu_nodes"])  # 6 GPUs: 4 + 2


def test_spread_puts_workers_on_different_nodes_when_asked(seen: dict[str, Any]) -> None:
    (replica,) = seen["spread2"]
    assert replica["strategy"] == "SPREAD"
    assert len(set(replica["bundle_nodes"])) == 2


def test_tp8_on_four_gpu_nodes_fails_fast_with_a_clear_error(seen: dict[str, Any]) -> None:
    error = seen["tp8"]["error"]
    assert error is not None and seen["tp8"]["seconds"] < 5
    assert error.startswith("models[tp8]: a replica needs bundles [{CPU: 0.5, GPU: 1}")
    assert "placed STRICT_PACK ({CPU: 2.25, GPU: 8} in all)" in error
    assert error.endswith("the largest node has {CPU: 4, GPU: 4}")
