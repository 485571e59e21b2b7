"""benchmarks/ray_hosted.py: a server's left-behind children are stopped with
it; the hosted/standalone ratios are taken per round."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from benchmarks.ray_hosted import stop_tree, summarise
from benchmarks.stream_load import Figures


def test_children_that_outlive_the_server_are_stopped_with_it() -> None:
    # As a Ray actor's engine processes outlive the driver that SIGTERM stops.
    child = "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    code = f"import subprocess, sys, time; {child}; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not (children := psutil.Process(proc.pid).children()):
        assert time.monotonic() < deadline, "the child was not started"
        time.sleep(0.05)
    stop_tree(proc)
    assert proc.returncode is not None
    assert not children[0].is_running() or children[0].status() == psutil.STATUS_ZOMBIE


def figures(tokens_per_s: float, ttft_ms: float) -> Figures:
    return Figures("aiohttp", 1, tokens_per_s, (ttft_ms, ttft_ms), (2.0, 4.0))


def test_ratios_are_paired_by_round(capsys: pytest.CaptureFixture[str]) -> None:
    summarise({
        "direct": [figures(400, 10.0), figures(200, 12.0), figures(300, 11.0)],
        "inproc": [figures(380, 10.5), figures(220, 11.0), figures(300, 13.0)],
        "child": [figures(200, 10.0), figures(200, 12.0), figures(300, 11.0)],
    })
    inproc, child = capsys.readouterr().out.splitlines()
    assert inproc.startswith("inproc/direct c=1 tok/s: median 1.000, geometric mean 1.015 ± ")
    assert "(rounds 0.95–1.10)" in inproc and "median +0.5 ms (-1.0 to +2.0)" in inproc
    assert child.startswith("child/direct c=1 tok/s: median 1.000, geometric mean 0.794 ± ")
    assert "(rounds 0.50–1.00)" in child and "median +0.0 ms (+0.0 to +0.0)" in child
