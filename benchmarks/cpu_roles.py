"""Where a server's CPU goes while it streams: CPU time per output token,
by the role of each process of its tree, over the timed part of a load run
(warm-up excluded).

On a 2-vCPU host the engine's worker holds one CPU and everything else
(vLLM's engine core, the process that writes the tokens, the load
generator, and, under the gateway, the ingress and Ray's daemons) shares the
other. A lone stream is then as fast as the engine core gets that CPU when
a step's result comes, so a few hundredths of a millisecond per token spent
by another process show up in its tokens/s; this names them, side by side
with vLLM's own server, in every run.

Roles: ``worker`` (vLLM's model runner processes), ``core`` (vLLM's engine
core, its scheduler), ``server`` (the process that turns engine outputs into
SSE: vLLM's API server, or the gateway's model replica), ``ingress`` (the
gateway's ingress replicas, and Serve's proxy or HAProxy where one is the
front door), ``background`` (everything else in the tree:
Ray's daemons, Serve's controller, the gateway's command), ``client`` (the
load generator: this process).
"""

from __future__ import annotations

import contextlib
import subprocess
import time

import psutil

ROLES = ("worker", "core", "server", "ingress", "background", "client")
# The command line of a process vLLM spawned whose title did not take (seen on some hosts).
SPAWNED = "multiprocessing.spawn import spawn_main"
# What a spawned process is, by its parent's role: vLLM's server spawns its engine core, which spawns its workers.
_SPAWNED_BY = {"server": "core", "core": "worker"}


def role(process: psutil.Process, root_pid: int, direct: bool, parent: str | None = None) -> str:
    """The role of one process of a server's tree (``direct``: vLLM's own
    server, whose root process is its API server; ``parent``: the role of
    the process's parent, for one vLLM spawned whose title did not take)."""
    name = process.name()
    if name.startswith("VLLM::Worker"):
        return "worker"
    if name.startswith("VLLM::EngineCor"):  # the kernel keeps 15 characters of a name
        return "core"
    if direct and process.pid == root_pid:
        return "server"
    title = " ".join(process.cmdline())
    if "ServeReplica" in title and ":LLMServer" in title:
        return "server"
    if "GatewayIngress" in title or "ProxyActor" in title or name.startswith("haproxy"):
        return "ingress"  # (Serve's proxy or HAProxy, as the front door, relay every chunk too)
    if SPAWNED in title and parent in _SPAWNED_BY:
        return _SPAWNED_BY[parent]
    return "background"


class CpuMeter:
    """CPU seconds by role between ``start`` and ``stop``, for the tree of
    ``proc`` and this process (the client). A process that starts between
    them counts whole; one that ends between them (none does while a
    server streams) is not counted."""

    def __init__(self, proc: subprocess.Popen, direct: bool) -> None:
        self._proc = proc
        self._direct = direct
        self._before: dict[tuple[int, float], tuple[str, float]] = {}
        self._client = 0.0
        self.seconds: dict[str, float] = {}

    def _snapshot(self) -> dict[tuple[int, float], tuple[str, float]]:
        """Each process's role and CPU so far, by pid and start time (a pid may be reused)."""
        root = psutil.Process(self._proc.pid)
        roles: dict[int, str] = {}
        taken = {}
        for process in [root, *root.children(recursive=True)]:  # parents before their children
            with contextlib.suppress(psutil.Error):
                roles[process.pid] = role(process, root.pid, self._direct, roles.get(process.ppid()))
                times = process.cpu_times()
                taken[(process.pid, process.create_time())] = (roles[process.pid], times.user + times.system)
        return taken

    def start(self) -> None:
        self._before = self._snapshot()
        self._client = time.process_time()  # after the snapshot: its own CPU is not the client's

    def stop(self) -> None:
        """Sums each role's CPU since ``start``."""
        client = time.process_time() - self._client  # before the snapshot, likewise
        seconds = dict.fromkeys(ROLES, 0.0)
        for key, (name, spent) in self._snapshot().items():
            seconds[name] += spent - self._before.get(key, (name, 0.0))[1]
        seconds["client"] = client
        self.seconds = seconds

    def per_token_ms(self, tokens: int) -> dict[str, float]:
        """Milliseconds of CPU per token by role; empty for no tokens."""
        return {name: spent * 1000 / tokens for name, spent in self.seconds.items()} if tokens else {}


def describe(cpu_ms: dict[str, float]) -> str:
    """``CPU ms/token worker 1.430 core 1.100 ...``, every role."""
    if not cpu_ms:
        return ""
    return "CPU ms/token " + " ".join(f"{name} {cpu_ms.get(name, 0.0):.3f}" for name in ROLES)
