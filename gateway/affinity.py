"""Keeps the gateway's own processes off the cores vLLM's CPU engine computes on.

vLLM's CPU backend binds its OpenMP threads to all but a few CPUs and leaves
those few (``VLLM_CPU_NUM_OF_RESERVED_CPU``, one by default) to everything
else. A gateway adds processes of its own (Ray's daemons, Serve's controller
and proxies, HAProxy, the ingress and metrics replicas); left to float, the
scheduler runs them on the engine's cores too, where each preemption stalls an
engine step. ``llm-gateway serve`` pins them to the reserved CPUs
(``runtime.gateway_cpus``). The model replicas and vLLM's own processes are
left where vLLM puts them, as under ``vllm serve``.

The processes no request waits on (Serve's controller, the metrics hub, Ray's
agents and monitors) also get a lower priority (``runtime.background_niceness``):
their periodic work then runs when the engine leaves a core free.

vLLM's engine-core process (its scheduler) floats on every CPU. Where vLLM
leaves a single CPU to everything but its workers, that CPU also runs the
gateway's processes, and under load the engine core queues behind them while
its workers wait for their next step. ``engine_core_placement`` finds where it
can go instead: onto its workers' CPUs, where, without asynchronous scheduling
(vLLM's CPU backend has none), workers and scheduler take turns. With few
requests the CPU left over is mostly idle, and the engine core's I/O threads
(each step's outputs serialized and sent) run there beside the workers' next
step rather than taking turns with it: the model replica moves the engine core
to whichever place it measures making tokens faster at the load it runs
(``models.llm.core_placement``).

Linux only (``/proc``, ``os.sched_setaffinity``); elsewhere nothing is pinned or lowered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Processes that are the engine's or a model's, by their command line (Ray
# names a replica's process after its deployment class; vLLM its own).
ENGINE_MARKERS = ("VLLM::", "LLMServer", "ClassicalServer")
ENGINE_CORE_TITLE = "VLLM::EngineCore"
WORKER_TITLE = "VLLM::Worker"
SPAWNED = b"multiprocessing.spawn import spawn_main"  # the command line of a process vLLM spawned
PROC = Path("/proc")
# The CPUs ``llm-gateway serve`` was started on, for the processes of its local cluster.
STARTED_CPUS = "LLM_GATEWAY_STARTED_CPUS"


def reserved_cpus(setting: str | Sequence[int]) -> set[int] | None:
    """The CPUs ``runtime.gateway_cpus`` names: ``auto`` picks the ones vLLM's
    CPU backend reserves (the last ``VLLM_CPU_NUM_OF_RESERVED_CPU`` of the
    CPUs it would compute on, one by default; see ``vllm_compute_cpus``), else
    the CPUs it leaves unused (SMT siblings, other NUMA nodes), and nothing
    where it uses them all, on hosts with an NVIDIA GPU or with fewer than
    two CPUs; ``off`` is None."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    if setting == "off":
        return None
    if not isinstance(setting, str):
        from gateway.config.base import ConfigError  # (gateway.config reads this module)

        listed, here = set(setting), os.sched_getaffinity(0)
        if not listed or not listed <= here:  # else nothing is pinned, and nothing says so
            raise ConfigError(
                f"runtime.gateway_cpus: {sorted(listed)} are not all among the CPUs this process may use, "
                f"{sorted(here)}"
            )
        return listed
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2 or _has_gpu():
        return None
    reserved = int(os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU") or 1)
    computing = vllm_compute_cpus(available)
    if 0 < reserved < len(computing):
        return set(computing[-reserved:])
    return set(available) - set(computing) or None  # vLLM reserves none of so few


# Architectures where vLLM's automatic binding takes one logical CPU (the
# last) of each physical core; elsewhere (Arm, RISC-V) it takes them all.
ONE_PER_CORE = ("x86_64", "amd64", "i386", "i686", "s390x")


def vllm_compute_cpus(available: Sequence[int]) -> list[int]:
    """The CPUs of ``available`` vLLM's automatic binding puts one engine's
    OpenMP threads on, reserved ones included, as it picks them: those of
    the first NUMA node, on x86 the last logical CPU of each physical core."""
    import platform

    topology = {cpu: _topology(cpu) for cpu in available}
    first = min(node for node, _ in topology.values())
    cores: dict[tuple[int, int], list[int]] = {}
    for cpu in sorted(available):
        node, core = topology[cpu]
        if node == first:
            cores.setdefault(core, []).append(cpu)
    one = platform.machine().lower() in ONE_PER_CORE
    return sorted(cpu for cpus in cores.values() for cpu in (cpus[-1:] if one else cpus))


SYS_CPU = Path("/sys/devices/system/cpu")


def _topology(cpu: int) -> tuple[int, tuple[int, int]]:
    """``cpu``'s NUMA node and physical core (package, core id); where Linux
    does not say, node 0 and a core of its own."""
    here = SYS_CPU / f"cpu{cpu}"
    try:
        core = (int((here / "topology/physical_package_id").read_text()), int((here / "topology/core_id").read_text()))
    except (OSError, ValueError):
        core = (-1, cpu)
    nodes = [int(entry.name[4:]) for entry in here.glob("node*") if entry.name[4:].isdigit()]
    return (min(nodes) if nodes else 0), core


def engine_core_placement(root: int) -> EngineCorePlacement | None:
    """Where each vLLM engine-core process of ``root`` (a model replica) can
    run, on a host without a GPU where vLLM's binding leaves exactly one of
    ``root``'s CPUs to everything else; None elsewhere (nothing to move)."""
    if not PROC.is_dir() or _has_gpu():
        return None
    children = _children()
    cores = [pid for pid in children.get(root, ()) if _is_vllm(pid, ENGINE_CORE_TITLE)]
    computing: set[int] = set()
    for core in cores:
        for worker in children.get(core, ()):
            if _is_vllm(worker, WORKER_TITLE):
                computing.update(*(_cpus(tid) for tid in _threads(worker)))
    if not computing or len(_cpus(root) - computing) != 1:
        return None
    return EngineCorePlacement({pid: _cpus(pid) for pid in cores}, computing)


@dataclass(frozen=True)
class EngineCorePlacement:
    """vLLM's engine-core processes (each with the CPUs vLLM left it on) and
    the CPUs their workers compute on; moves every thread of each core, as
    Linux keeps an affinity per thread."""

    cores: dict[int, set[int]]
    workers: set[int]

    def beside_workers(self) -> None:
        for pid in self.cores:
            _move_threads(pid, self.workers)

    def where_vllm_left(self) -> None:
        for pid, cpus in self.cores.items():
            _move_threads(pid, cpus)


def place_engine_core(root: int) -> set[int] | None:
    """Pins every thread of each vLLM engine-core process of ``root`` to the
    CPUs its workers are bound to, where ``engine_core_placement`` finds them;
    returns those CPUs, or None when nothing was moved."""
    placement = engine_core_placement(root)
    if placement is None:
        return None
    placement.beside_workers()
    return placement.workers


def _move_threads(pid: int, cpus: set[int]) -> None:
    for tid in _threads(pid):
        with contextlib.suppress(OSError):  # the thread ended
            os.sched_setaffinity(tid, cpus)


def _is_vllm(pid: int, title: str) -> bool:
    """Whether ``pid`` is vLLM's process titled ``title``, or a process vLLM
    spawned whose title did not take (seen on some hosts)."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return argv[0].decode(errors="replace").startswith(title) or SPAWNED in b" ".join(argv)


def _threads(pid: int) -> list[int]:
    """``pid``'s threads (none when it is gone)."""
    try:
        return [int(task.name) for task in (PROC / str(pid) / "task").iterdir()]
    except OSError:
        return []


def _cpus(tid: int) -> set[int]:
    try:
        return os.sched_getaffinity(tid)
    except OSError:
        return set()


def _has_gpu(dev: Path = Path("/dev")) -> bool:
    """Whether an NVIDIA GPU is visible here: any ``/dev/nvidiaN`` (a container
    given only its fourth GPU has ``/dev/nvidia3`` alone)."""
    return any(name.removeprefix("nvidia").isdigit() for name in _names(dev) if name.startswith("nvidia"))


def _names(folder: Path) -> list[str]:
    try:
        return [entry.name for entry in folder.iterdir()]
    except OSError:
        return []


def pin_gateway_processes(root: int, cpus: set[int]) -> int:
    """Pins every thread of ``root`` and of its descendants that are not the
    engine's or a model's, nor started by one, to ``cpus``; returns how many
    processes were pinned anew. Linux keeps an affinity per thread: a Ray
    worker's event loop, gRPC and I/O threads run before it is first seen,
    and would stay on every CPU if only its main thread were pinned. What a
    model started is its own however it is titled (a spawned process not yet
    titled, a TP worker, a custom ``VLLM_PROCESS_NAME_PREFIX``): pinned, the
    engine's compute threads would run on the gateway's CPUs."""
    pinned = 0
    children = _children()
    stack = [root]
    while stack:
        pid = stack.pop()
        if is_engine(pid):
            continue  # nor anything below it
        pinned += _pin_threads(pid, cpus)
        stack.extend(children.get(pid, ()))
    return pinned


def _pin_threads(pid: int, cpus: set[int]) -> bool:
    """Pins each of ``pid``'s threads to ``cpus``; True when any moved."""
    moved = False
    for tid in _threads(pid):
        try:
            if os.sched_getaffinity(tid) != cpus:
                os.sched_setaffinity(tid, cpus)
                moved = True
        except OSError:
            continue  # the thread ended, or is not ours
    return moved


# What no request waits on, by process title (Ray names an actor's process
# after it) or script: Serve's controller, the gateway's metrics hub, Ray's
# agents, log monitor, dashboard and autoscaler monitor; Serve's Python proxy
# too where HAProxy is the front door (``PROXY_TITLE``). Not HAProxy's
# manager: it starts HAProxy (on every reload), which would inherit its
# niceness. Not Ray's GCS and raylets: actor calls and worker starts go
# through them. Processes are matched by name, never by what they are not:
# an idle Ray worker may become a model replica.
BACKGROUND_TITLES = (
    "ray::ServeController",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
)
PROXY_TITLE = "ray::ProxyActor"
BACKGROUND_REPLICAS = (":MetricsHub",)  # a Serve replica's title: ray::ServeReplica:<app>:<deployment>
BACKGROUND_SCRIPTS = (
    "ray/_private/log_monitor.py",
    "ray/dashboard/dashboard.py",
    "ray/autoscaler/_private/monitor.py",
)


def is_background(pid: int, proxy: bool = False) -> bool:
    """Whether ``pid`` is one of the gateway's processes that no request waits
    on (``proxy``: Serve's Python proxy is one: HAProxy is the front door)."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    title = argv[0].decode(errors="replace").strip()
    if title.startswith(BACKGROUND_TITLES) or (proxy and title.startswith(PROXY_TITLE)):
        return True
    if title.startswith("ray::ServeReplica:"):
        return title.split(".", 1)[0].endswith(BACKGROUND_REPLICAS)
    return any(arg.decode(errors="replace").endswith(BACKGROUND_SCRIPTS) for arg in argv[1:3])


def lower_background(root: int, niceness: int, proxy: bool = False) -> int:
    """Gives every thread of ``root`` (``llm-gateway serve`` itself) and of
    its background descendants (``is_background``) at least ``niceness``;
    returns how many processes were lowered anew.

    On a CPU host the engine computes on the same cores: their periodic work
    then waits for the engine instead of stalling its steps. Linux keeps a
    niceness per thread, and a thread starts with its creator's.
    """
    if not PROC.is_dir():
        return 0  # not Linux: left alone
    lowered = 0
    for pid in process_tree(root):
        if pid != root and not is_background(pid, proxy):
            continue
        changed = False
        for tid in _threads(pid):
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)
                    changed = True
            except OSError:
                continue  # the thread ended
        lowered += changed
    return lowered


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


def _children() -> dict[int, list[int]]:
    """Every process's children."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    children = _children()
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


def started_cpus() -> dict[str, str]:
    """The variable that tells a local cluster's processes which CPUs
    ``llm-gateway serve`` itself was started on (``unpin_self``)."""
    if not hasattr(os, "sched_getaffinity"):
        return {}
    return {STARTED_CPUS: ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))}


def unpin_self() -> None:
    """Lets this process (a model replica) run on every CPU the gateway was
    started on again (``STARTED_CPUS``; not past an operator's ``taskset`` or
    systemd ``CPUAffinity``).

    New Ray workers inherit the pinned mask of the daemon that starts them,
    and an idle worker's threads are pinned like any gateway process's; a
    model replica must not stay so, or the engine it starts would find only
    the reserved CPUs to compute on. Every thread is widened: each keeps its
    own mask. In a cluster the gateway did not start, nothing was pinned and
    nothing is widened.
    """
    started = os.environ.get(STARTED_CPUS)
    if not started or not hasattr(os, "sched_setaffinity"):
        return
    every = {int(cpu) for cpu in started.split(",")}
    for tid in _threads(os.getpid()) or [0]:
        try:
            os.sched_setaffinity(tid, every)
        except OSError:
            if tid in (0, threading.get_native_id()):
                logger.warning("could not widen this replica's CPU affinity; keeping %s", os.sched_getaffinity(0))
