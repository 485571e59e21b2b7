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
gateway's ingress replicas), ``background`` (everything else in the tree:
Ray's daemons, Serve's controller, the gateway's command), ``client`` (the
load generator: this process).
"""

from __future__ import annotations

import contextlib
import subprocess
import time

import psutil

ROLES = ("worker", "core", "server", "ingress", "background", "client")


def role(process: psutil.Process, root_pid: int, direct: bool) -> str:
    """The role of one process of a server's tree (``direct``: vLLM's own
    server, whose root process is its API server)."""
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
    if "GatewayIngress" in title:
        return "ingress"
    return "background"


class CpuMeter:
    """CPU seconds by role between ``start`` and ``stop``, for the tree of
    ``proc`` and this process (the client)."""

    def __init__(self, proc: subprocess.Popen, direct: bool) -> None:
        self._proc = proc
        self._direct = direct
        self._before: dict[int, tuple[str, float]] = {}
        self._client = 0.0
        self.seconds: dict[str, float] = {}

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        root = psutil.Process(self._proc.pid)
        taken = {}
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                taken[process.pid] = (role(process, root.pid, self._direct), times.user + times.system)
        return taken

    def start(self) -> None:
        self._before = self._snapshot()
        self._client = time.process_time()

    def stop(self) -> None:
        """Sums each role's CPU since ``start``; a process that started since counts whole."""
        seconds = dict.fromkeys(ROLES, 0.0)
        for pid, (name, spent) in self._snapshot().items():
            seconds[name] += spent - self._before.get(pid, (name, 0.0))[1]
        seconds["client"] = time.process_time() - self._client
        self.seconds = seconds

    def per_token_ms(self, tokens: int) -> dict[str, float]:
        return {name: spent * 1000 / tokens for name, spent in self.seconds.items()} if tokens else {}


def describe(cpu_ms: dict[str, float]) -> str:
    """``CPU ms/token worker 1.43 core 1.10 ...``, every role."""
    if not cpu_ms:
        return ""
    return "CPU ms/token " + " ".join(f"{name} {cpu_ms.get(name, 0.0):.3f}" for name in ROLES)
