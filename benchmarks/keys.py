"""What API keys and their limits cost, on the echo model, in one gateway run.

Starts ``llm-gateway serve`` with an echo model and no keys, then deploys
keys live (``llm-gateway deploy``'s path) and back, alternating, so every
variant is measured on the same running gateway, once per round (the keyed
variants in a rotating order):

- ``no keys``: the open gateway;
- ``key``: a key without limits (the hash look-up alone);
- ``key+rpm``: a key with ``rpm`` and ``max_concurrent`` (admitted from
  leases of the shared ledger, the first requests reserved there one by one);
- ``key+tpm``: a key with a token limit too (the ingress counts the prompt
  before admitting it).

Non-streaming chat, latency p50 at concurrency 1, and at 32 requests/s and
the CPU the gateway's processes spent per request (all of its process tree:
the cost itself, whatever share of the cores the load generator takes), load
generator on the same machine.

    python -m benchmarks.keys
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from benchmarks.idle_cpu import cpu_seconds
from benchmarks.servers import cpu_model, stop, wait_ready
from benchmarks.stream_load import echo_overhead
from gateway.affinity import process_tree
from gateway.auth.keys import hash_secret, new_secret

LIMIT = 10**9  # limits that never refuse: what is measured is their bookkeeping


def config(keys: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "app_name": "bench-keys",
        "models": [{"name": "echo", "engine": "echo", "num_cpus": 0.1}],
        "keys": keys,
    }


def write(data: dict[str, Any]) -> Path:
    path = Path(tempfile.mkstemp(suffix=".yaml")[1])
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=400, help="per measurement at c=1 (six times that at 32)")
    args = parser.parse_args()

    secrets = {name: new_secret() for name in ("key", "key+rpm", "key+tpm")}
    limits = {"key": {}, "key+rpm": {"rpm": LIMIT, "max_concurrent": LIMIT},
              "key+tpm": {"rpm": LIMIT, "tpm": LIMIT, "max_concurrent": LIMIT}}
    keys = [{"id": name.replace("+", "-"), "hash": hash_secret(s), **limits[name]} for name, s in secrets.items()]
    open_config, keyed_config = write(config([])), write(config(keys))
    base = f"http://127.0.0.1:{args.port}"
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(open_config),
           "--host", "127.0.0.1", "--port", str(args.port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    results: dict[str, list[tuple[float, float, float]]] = {}
    try:
        wait_ready(base + "/ready", proc)
        keyed = [(name, keyed_config, {"authorization": f"Bearer {s}"}) for name, s in secrets.items()]
        for round_ in range(args.rounds):
            turn = round_ % len(keyed)  # each keyed variant takes each place in the order in turn
            for name, path, headers in [("no keys", open_config, {})] + keyed[turn:] + keyed[:turn]:
                if name == "no keys" or (name, path, headers) == keyed[turn]:  # the config they need
                    subprocess.run([sys.executable, "-m", "gateway.cli", "deploy", "--config", str(path)],
                                   check=True, capture_output=True)
                    time.sleep(2)
                p50, _ = asyncio.run(echo_overhead(base, 1, args.requests, headers))
                before = tree_cpu(proc.pid)
                _, rate = asyncio.run(echo_overhead(base, 32, args.requests * 6, headers))
                cpu_ms = (tree_cpu(proc.pid) - before) * 1000 / (args.requests * 6 + 5 * 32)
                results.setdefault(name, []).append((p50, rate, cpu_ms))
                print(f"    {name:<8} c=1 p50 {p50:.3f} ms   c=32 {rate:.0f} req/s, "
                      f"{cpu_ms:.3f} CPU ms per request", flush=True)
    finally:
        stop(proc)
        open_config.unlink(missing_ok=True)
        keyed_config.unlink(missing_ok=True)
    print(f"\nllm-gateway keys benchmark, {cpu_model()}, echo model, non-streaming chat")
    print("  medians over the rounds; in brackets the median of each round's change against the")
    print("  open gateway of the same round (this host's speed drifts between rounds)")
    open_runs = results["no keys"]
    for name, runs in results.items():
        p50, rate, cpu_ms = (statistics.median(r[i] for r in runs) for i in range(3))
        added = statistics.median(r[0] - b[0] for r, b in zip(runs, open_runs))
        rate_change = statistics.median(r[1] / b[1] - 1 for r, b in zip(runs, open_runs))
        cpu_change = statistics.median(r[2] / b[2] - 1 for r, b in zip(runs, open_runs))
        print(f"  {name:<8} c=1 p50 {p50:6.3f} ms ({added:+.3f} ms)   "
              f"c=32 {rate:6.0f} req/s ({rate_change:+.1%}), "
              f"{cpu_ms:.3f} CPU ms per request ({cpu_change:+.1%})")


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by the gateway's processes (all of ``root``'s tree)."""
    total = 0.0
    for pid in process_tree(root):
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


if __name__ == "__main__":
    main()
