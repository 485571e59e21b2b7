"""Keeps the gateway's own processes off the cores vLLM's CPU engine computes on.

vLLM's CPU backend binds its OpenMP threads to all but a few CPUs and leaves
those few (``VLLM_CPU_NUM_OF_RESERVED_CPU``, one by default) to everything
else. A gateway adds processes of its own (Ray's daemons, Serve's controller
and proxies, HAProxy, the ingress and metrics replicas); left to float, the
scheduler runs them on the engine's cores too, where each preemption stalls an
engine step. ``llm-gateway serve`` pins them to the reserved CPUs
(``runtime.gateway_cpus``). The model replicas and vLLM's own processes are
left where vLLM puts them, as under ``vllm serve``.

Linux only (``/proc``, ``os.sched_setaffinity``); elsewhere nothing is pinned.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Processes that are the engine's or a model's, by their command line (Ray
# names a replica's process after its deployment class; vLLM its own).
ENGINE_MARKERS = ("VLLM::", "LLMServer", "ClassicalServer")
PROC = Path("/proc")


def reserved_cpus(setting: str | Sequence[int]) -> set[int] | None:
    """The CPUs ``runtime.gateway_cpus`` names: ``auto`` picks the ones vLLM's
    CPU backend reserves (the last ``VLLM_CPU_NUM_OF_RESERVED_CPU`` of this
    process's CPUs, one by default), and nothing on hosts with an NVIDIA GPU or
    with fewer than two CPUs; ``off`` is None."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    if setting == "off":
        return None
    if not isinstance(setting, str):
        return set(setting)
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2 or _has_gpu():
        return None
    reserved = int(os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU") or 1)
    return set(available[-min(reserved, len(available) - 1) :])


def _has_gpu() -> bool:
    return Path("/dev/nvidia0").exists()


def pin_gateway_processes(root: int, cpus: set[int]) -> int:
    """Pins ``root`` and its descendants that are not the engine's or a model's
    to ``cpus``; returns how many processes were pinned anew."""
    pinned = 0
    for pid in process_tree(root):
        if is_engine(pid):
            continue
        try:
            if os.sched_getaffinity(pid) != cpus:
                os.sched_setaffinity(pid, cpus)
                pinned += 1
        except OSError:
            continue  # gone, or not ours
    return pinned


def _parents() -> dict[int, int]:
    """Every process's parent, from ``/proc/<pid>/stat``."""
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, ()))
    return tree


def is_engine(pid: int) -> bool:
    """Whether ``pid`` is vLLM's or a model replica's (or can no longer be read)."""
    try:
        cmdline = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # unknown: leave it alone
    return any(marker in cmdline for marker in ENGINE_MARKERS)


def unpin_self() -> None:
    """Lets this process (a model replica) run on every CPU again.

    New Ray workers inherit the pinned mask of the daemon that starts them; a
    model replica must not, or the engine it starts would find only the
    reserved CPUs to compute on.
    """
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
        except OSError:
            logger.warning("could not widen this replica's CPU affinity; keeping %s", os.sched_getaffinity(0))
