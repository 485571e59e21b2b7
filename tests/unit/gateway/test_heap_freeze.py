"""gateway/heap_freeze.py: a replica's start-up objects leave the collector's full walks."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

from gateway.heap_freeze import freeze_in_replica

ROOT = Path(__file__).resolve().parents[3]

# Run in a process of its own: freezing is for the life of a process.
START_UP = """
import gc, json, weakref
gc.disable()  # only the freeze's own collection may collect the start-up garbage
from gateway.heap_freeze import freeze_start_up_objects

class Node:
    pass

garbage = Node()
garbage.me = garbage  # a cycle: only a collection frees it
collected = []
weakref.finalize(garbage, collected.append, True)
del garbage
kept = [Node() for _ in range(50_000)]
full = []
gc.callbacks.append(lambda phase, info: phase == "stop" and info["generation"] == 2 and full.append(1))
first = freeze_start_up_objects()
second = freeze_start_up_objects()
print(json.dumps({"collected": collected, "first": first, "second": second, "full": len(full),
                  "walked": len(gc.get_objects())}))
"""


def test_start_up_garbage_is_collected_then_what_lives_is_frozen_once() -> None:
    done = subprocess.run([sys.executable, "-c", START_UP], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["collected"] == [True]  # not frozen with the rest, forever
    assert result["first"] >= 50_000 and result["second"] == result["first"]
    assert result["full"] == 1  # the second call collects nothing again
    assert result["walked"] < 5_000  # what a full collection still walks: what came after


def test_a_process_that_is_not_a_replica_keeps_its_collector_as_it_was() -> None:
    import ray

    started = ray.is_initialized()
    frozen = gc.get_freeze_count()
    freeze_in_replica()
    assert gc.get_freeze_count() == frozen
    assert ray.is_initialized() == started  # asking did not start Ray
