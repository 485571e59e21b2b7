"""How `llm-gateway serve` starts its local Ray cluster: the front door's
proxy, Serve's mode, CPU placement and niceness of the gateway's processes."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import Field, field_validator

from gateway.affinity import reserved_cpus
from gateway.config.base import StrictConfig

class RuntimeConfig(StrictConfig):
    """How `llm-gateway serve` starts a local Ray cluster (no effect on an existing one)."""

    http_proxy: Literal["gateway", "haproxy", "serve"] = Field(
        "gateway",
        description="`gateway` (default): no proxy, the ingress replicas accept clients "
        "themselves, all on the front door's port (a handed-over stream goes from the "
        "engine's process straight to the client); `haproxy`: Ray's HAProxy ingress "
        "forwards HTTP to the ingress replicas; `serve`: Ray Serve's Python proxy actor.",
    )
    throughput_optimized: bool = Field(
        True,
        description="Ray Serve's throughput mode: user code and routing on the "
        "replica's own event loop, gRPC between deployments.",
    )
    worker_niceness: int = Field(
        0,
        ge=0,
        le=19,
        description="Scheduling niceness of Ray workers. Ray's default (15) yields "
        "the CPU to anything else on the machine; the gateway's workers are the server.",
    )

    gateway_cpus: Literal["auto", "off"] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = Field(
        "off",
        description="CPUs the gateway's own processes (Ray's daemons, Serve's controller "
        "and proxy, HAProxy, the ingress and metrics replicas) are pinned to, away from "
        "the cores vLLM's CPU engine computes on. `off` (default; on 2 vCPUs pinning "
        "measured no clear gain: the one reserved core also holds the model replica's "
        "serving layer); `auto`: on hosts without a GPU, the CPUs vLLM's CPU backend "
        "reserves for other processes (the last `VLLM_CPU_NUM_OF_RESERVED_CPU` of those it "
        "computes on, one by default), else those it leaves unused; or a list of CPU ids.",
    )
    haproxy_threads: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = Field(
        "auto",
        description="Threads of HAProxy, the front door with `http_proxy: haproxy`. `auto`: half this "
        "machine's CPUs, at least 1 and at most 4 (Ray's own default), and no more than "
        "`gateway_cpus` pins it to; or a count. Threads beyond the cores the host can spare "
        "compete with the engine's: on 2 vCPUs one thread streamed 1.05-1.40x the tokens/s "
        "of four at 8 concurrent streams.",
    )
    background_niceness: int = Field(
        19,
        ge=0,
        le=19,
        description="Scheduling niceness of the gateway's processes that no request waits "
        "on: Serve's controller (and its Python proxy behind HAProxy), the metrics hub, "
        "Ray's agents and monitors, `llm-gateway serve` itself. On a busy CPU host their "
        "periodic work then waits for the engine instead of stalling its steps; the "
        "request path (HAProxy, the ingress, model replicas and engines, Ray's GCS and "
        "raylet) keeps `worker_niceness`. 0 leaves them alone.",
    )

    control_loop_s: float = Field(
        0.5,
        ge=0.05,
        le=5,
        description="How often Serve's controller runs its control loop (Ray's default: "
        "0.1 s). Each pass costs about 3 ms of CPU on a 2-vCPU host, so Ray's default takes "
        "3 % of a core from the engines, idle or not; at 0.5 s a replica that starts, stops "
        "or fails is acted on up to 0.4 s later. Requests do not wait on it: the gateway "
        "routes streams and bodies itself and moves off a replica that is gone.",
    )

    @field_validator("gateway_cpus", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        return "off" if value is False else value  # (YAML reads a bare `off` as false)

    def haproxy_thread_count(self) -> int:
        """``haproxy_threads`` resolved on this machine."""
        if self.haproxy_threads != "auto":
            return self.haproxy_threads
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = min(4, max(1, cpus // 2))
        pinned = reserved_cpus(self.gateway_cpus)  # HAProxy is one of the gateway's processes
        return min(threads, len(pinned)) if pinned else threads

    def environment(self) -> dict[str, str]:
        """Variables Ray and Ray Serve read when the local cluster starts."""
        return {
            "RAY_SERVE_HAPROXY_NBTHREAD": str(self.haproxy_thread_count()),
            "RAY_worker_niceness": str(self.worker_niceness),
            # Engine processes die with their replica, even when it is killed.
            "RAY_process_group_cleanup_enabled": "1",
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if self.throughput_optimized else "0",
            "RAY_SERVE_ENABLE_HA_PROXY": "1" if self.http_proxy == "haproxy" else "0",
            # Serve's controller runs a proxy on the head node whenever its
            # replicas serve HTTP themselves ("direct ingress"); the gateway's
            # own front door is its ingress replicas' listeners instead.
            **({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"} if self.http_proxy == "gateway" else {}),
            # Serve's HTTP metrics from HAProxy cost a log line per request that
            # HAProxy writes and Serve's HAProxy manager parses; the gateway
            # counts every request itself (gateway_requests_total and the rest).
            "RAY_SERVE_HAPROXY_METRICS_ENABLED": os.environ.get("RAY_SERVE_HAPROXY_METRICS_ENABLED", "0"),
            # Serve's replicas decode its session header (`x-session-id` by
            # default, also the gateway's cohort header) as strict UTF-8 before
            # the gateway sees the request; the gateway does not use Serve's
            # session routing, so Serve is pointed at a header nobody sends.
            "RAY_SERVE_SESSION_ID_HEADER_KEY": "x-llm-gateway-serve-session",
            # Serve keeps a stopping replica of an application's ingress
            # deployment reachable this long before it drains (30 s by default)
            # so that load balancers deregister it. Each model is an application
            # of its own, reached only through the gateway's relay, which moves to
            # another replica when one refuses; HAProxy retries refused
            # connections too. Without this every scale-down or replacement
            # takes 30 s more than its requests need.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
            # Serve reloads HAProxy whenever its ingress replicas change (one
            # added, replaced or stopped), and the old HAProxy process cut the
            # streams it still carried 120 s later: a long generation died
            # mid-stream, with no error event. Ten minutes; not longer, since
            # Serve keeps each port an old process may still use out of its
            # pool (1,000 a node) as long, plus 30 s.
            "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": os.environ.get("RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S", "600"),
            "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": str(self.control_loop_s),
            # Ray's task events (the dashboard's task list, `ray list tasks`)
            # and its own metrics (`ray_*`, `ray_serve_*`, exported through the
            # dashboard agent) are reported by every process each second, busy
            # or idle; the gateway serves its own metrics and uses neither.
            # Either comes back when set before `llm-gateway serve`.
            "RAY_task_events_report_interval_ms": os.environ.get("RAY_task_events_report_interval_ms", "0"),
            "RAY_enable_metrics_collection": os.environ.get("RAY_enable_metrics_collection", "0"),
            # Each Serve replica and each handle's router hands its cached
            # request counts and latencies to those metrics every 0.1 s, a
            # wake-up of its event loop even when idle; once a second does
            # while the metrics are off.
            "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": os.environ.get(
                "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "100" if _rays_metrics_on() else "1000"
            ),
            # Ray's log monitor (which brings the replicas' output to
            # `llm-gateway serve`'s terminal) looks for new log files every 0.1 s
            # below 1,000 files, every 0.5 s above: a new replica's first lines
            # may now come 0.4 s later, for a fifth of its globbing.
            "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": os.environ.get("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0"),
        }


def _rays_metrics_on() -> bool:
    """Whether the operator turned Ray's own metrics back on (as Ray reads a flag)."""
    return os.environ.get("RAY_enable_metrics_collection", "").strip().lower() in ("1", "true")
