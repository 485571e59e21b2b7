"""CPU the gateway uses while it answers nothing.

Starts ``llm-gateway serve`` with a config (the shipped default unless told),
waits until it is ready and has settled, then reads every process of its tree
from ``/proc`` over a window and prints the CPU each took, in cores, and the
total: the gateway's own processes apart from the engines and models.

    python -m benchmarks.idle_cpu --config configs/default.yaml

``--compare-ray-defaults`` first measures the same config with Ray's own
settings for what the gateway turns down (Serve's control loop every 0.1 s,
task events and Ray's metrics reported each second, log files looked for
every 0.1 s), then the gateway's, one after the other in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

from benchmarks.servers import stop, wait_ready
from gateway.affinity import ENGINE_MARKERS, process_tree

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def name(pid: int) -> str:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return cmdline.strip()[:90] or f"pid {pid}"


def sample(root: int, window_s: float) -> dict[str, float]:
    """Cores each process of ``root``'s tree used over ``window_s`` (by command line)."""
    pids = process_tree(root)
    before = {}
    for pid in pids:
        try:
            before[pid] = cpu_seconds(pid)
        except OSError:
            continue
    time.sleep(window_s)
    used: dict[str, float] = defaultdict(float)
    for pid, start in before.items():
        try:
            used[name(pid)] += (cpu_seconds(pid) - start) / window_s
        except OSError:
            continue
    return used


# Ray's own values for what the gateway's runtime turns down (gateway.config.runtime).
RAY_DEFAULTS = {
    "RAY_task_events_report_interval_ms": "1000",
    "RAY_enable_metrics_collection": "1",
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "1000",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "100",
}
RAY_CONTROL_LOOP_S = 0.1


def measure(config: str, port: int, args: argparse.Namespace, env: dict[str, str] | None = None) -> dict[str, float]:
    """Cores each process of a gateway started on ``config`` used while idle."""
    log = Path(tempfile.gettempdir()) / "bench-idle.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", config, "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", proc)
        time.sleep(args.settle_s)
        return sample(proc.pid, args.window_s)
    finally:
        stop(proc)


def with_ray_control_loop(config: str) -> str:
    """A copy of ``config`` with Serve's control loop at Ray's own interval."""
    data = yaml.safe_load(Path(config).read_text())
    data.setdefault("runtime", {})["control_loop_s"] = RAY_CONTROL_LOOP_S
    path = Path(tempfile.gettempdir()) / "bench-idle-ray-defaults.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def report(title: str, used: dict[str, float], args: argparse.Namespace) -> None:
    gateway = {n: c for n, c in used.items() if not any(m in n for m in ENGINE_MARKERS)}
    models = {n: c for n, c in used.items() if n not in gateway}
    print(f"== {title}")
    for group_title, group in (("gateway", gateway), ("engines and models", models)):
        print(f"{group_title}: {sum(group.values()):.3f} cores")
        for n, c in sorted(group.items(), key=lambda item: -item[1])[:12]:
            print(f"  {c:6.3f}  {n}")
    print(f"idle, {args.config}, {title}, {args.window_s:.0f} s window: gateway {sum(gateway.values()):.3f} "
          f"cores, engines and models {sum(models.values()):.3f} cores, {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--port", type=int, default=8103)
    parser.add_argument("--settle-s", type=float, default=30)
    parser.add_argument("--window-s", type=float, default=30)
    parser.add_argument("--compare-ray-defaults", action="store_true",
                        help="measure with Ray's own settings first (see the module's doc)")
    args = parser.parse_args()
    runs = []
    if args.compare_ray_defaults:
        runs.append(("Ray's defaults", measure(with_ray_control_loop(args.config), args.port, args, RAY_DEFAULTS)))
    runs.append(("the gateway's runtime", measure(args.config, args.port, args)))
    for title, used in runs:
        report(title, used, args)


if __name__ == "__main__":
    main()
