"""CPU the gateway uses while it answers nothing.

Starts ``llm-gateway serve`` with a config (the shipped default unless told),
waits until it is ready and has settled, then reads every process of its tree
from ``/proc`` over a window and prints the CPU each took, in cores, and the
total: the gateway's own processes apart from the engines and models.

    python -m benchmarks.idle_cpu --config configs/default.yaml
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--port", type=int, default=8103)
    parser.add_argument("--settle-s", type=float, default=30)
    parser.add_argument("--window-s", type=float, default=30)
    args = parser.parse_args()
    log = Path(tempfile.gettempdir()) / "bench-idle.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", args.config, "--port", str(args.port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(f"http://127.0.0.1:{args.port}/ready", proc)
        time.sleep(args.settle_s)
        used = sample(proc.pid, args.window_s)
    finally:
        stop(proc)
    gateway = {n: c for n, c in used.items() if not any(m in n for m in ENGINE_MARKERS)}
    models = {n: c for n, c in used.items() if n not in gateway}
    for title, group in (("gateway", gateway), ("engines and models", models)):
        print(f"{title}: {sum(group.values()):.3f} cores")
        for n, c in sorted(group.items(), key=lambda item: -item[1])[:12]:
            print(f"  {c:6.3f}  {n}")
    print(f"idle, {args.config}, {args.window_s:.0f} s window: gateway {sum(gateway.values()):.3f} cores, "
          f"engines and models {sum(models.values()):.3f} cores, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
