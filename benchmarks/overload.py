"""Overload: a vLLM model offered four times what it takes, in one gateway run.

``tiny-chat-v1`` (the real vLLM engine) with ``max_ongoing_requests: 8`` and
``max_queued_requests: 8``: it takes 16 requests at once. Closed-loop
clients send non-streaming chat (32 tokens each), first 16 of them (at
capacity, nothing refused) and then 64 (four times capacity) for the same
time, twice: clients that wait 100 ms after a refusal (impatient ones; not
backing off at all, a 2-core machine would measure the load generator's own
spin), then clients that wait what ``Retry-After`` says, as the OpenAI SDK's
retries do.

Reported: accepted requests' latency p50/p99 at capacity and at 4x (what
overload costs the requests that are taken), the refusals' latency, and every
status seen: refusals must be 503 ``overloaded`` with ``Retry-After``, and
nothing else may be 5xx.

    python -m benchmarks.overload
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
from collections import Counter
from pathlib import Path

import aiohttp

from benchmarks.keys import tree_cpu
from benchmarks.servers import cpu_model, stop, wait_ready
from benchmarks.stream_load import quantile

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-chat-v1"
ONGOING, QUEUED = 8, 8
CAPACITY = ONGOING + QUEUED
BACKOFF_S = 0.1


def config(haproxy_threads: str = "auto", gateway_cpus: str = "off") -> dict[str, object]:
    cpus: object = gateway_cpus if gateway_cpus in ("auto", "off") else [int(c) for c in gateway_cpus.split(",")]
    return {
        "app_name": "bench-overload",
        "runtime": {
            "haproxy_threads": haproxy_threads if haproxy_threads == "auto" else int(haproxy_threads),
            "gateway_cpus": cpus,
        },
        "models": [{
            "name": MODEL, "engine": "vllm", "model": str(ROOT / ".models" / MODEL),
            "max_model_len": 512, "kv_cache_space_gib": 1,
            "max_ongoing_requests": ONGOING, "max_queued_requests": QUEUED,
        }],
    }


class Tally:
    def __init__(self) -> None:
        self.accepted: list[float] = []
        self.refused: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.unexplained: list[str] = []
        self.gateway_cpu = 0.0  # cores the gateway's processes (engine included) used
        self.client_cpu = 0.0  # cores this load generator used


async def client(
    session: aiohttp.ClientSession, url: str, until: float, tally: Tally, i: int, patient: bool
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell story {i}."}],
            "max_tokens": 32, "ignore_eos": True}
    while time.monotonic() < until:
        started = time.perf_counter()
        async with session.post(url, json=body) as response:
            data = await response.read()
        took = time.perf_counter() - started
        status = response.status
        if status == 200:
            tally.accepted.append(took)
            tally.statuses["200"] += 1
            continue
        code = json.loads(data).get("error", {}).get("code")
        tally.statuses[f"{status} {code}"] += 1
        if status == 503 and code == "overloaded" and "Retry-After" in response.headers:
            tally.refused.append(took)
        else:
            tally.unexplained.append(f"{status} {data[:200]!r}")
        wait = BACKOFF_S
        if patient:  # as the OpenAI SDK: retry-after-ms, else Retry-After (seconds)
            ms_header = response.headers.get("retry-after-ms")
            wait = float(ms_header) / 1000 if ms_header else float(response.headers.get("Retry-After", BACKOFF_S))
        await asyncio.sleep(wait)


async def phase(base: str, clients: int, seconds: float, patient: bool = False) -> Tally:
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        until = time.monotonic() + seconds
        url = base + "/v1/chat/completions"
        await asyncio.gather(*(client(session, url, until, tally, i, patient) for i in range(clients)))
    return tally


def ms(values: list[float], q: float) -> str:
    return f"{quantile(values, q) * 1000:7.1f}" if values else "      -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--haproxy-threads", default="auto", help="runtime.haproxy_threads (default: auto)")
    parser.add_argument("--gateway-cpus", default="off", help="runtime.gateway_cpus: off (default), auto or 1,2,...")
    args = parser.parse_args()
    path = Path(tempfile.mkstemp(suffix=".yaml")[1])
    path.write_text(json.dumps(config(args.haproxy_threads, args.gateway_cpus)))
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    base = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--host", "127.0.0.1",
         "--port", str(args.port)], stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    results: dict[str, Tally] = {}
    try:
        wait_ready(base + "/ready", proc)
        asyncio.run(phase(base, CAPACITY, 5))  # warm-up: the engine meets its batch shapes
        phases = (
            ("capacity (16 clients)", CAPACITY, False),
            ("4x capacity (64 clients)", 4 * CAPACITY, False),
            ("4x, honouring Retry-After", 4 * CAPACITY, True),
        )
        for name, clients, patient in phases:
            gateway_before, client_before = tree_cpu(proc.pid), time.process_time()
            results[name] = tally = asyncio.run(phase(base, clients, args.seconds, patient))
            tally.gateway_cpu = (tree_cpu(proc.pid) - gateway_before) / args.seconds
            tally.client_cpu = (time.process_time() - client_before) / args.seconds
    finally:
        stop(proc)
        path.unlink(missing_ok=True)
    log.unlink()  # kept when the run failed, for its reason
    print(f"\nllm-gateway overload benchmark, {cpu_model()}, {MODEL} (vLLM), non-streaming chat, "
          f"32 tokens, max_ongoing {ONGOING} + max_queued {QUEUED}, {args.seconds:.0f} s per phase, "
          f"HAProxy threads {args.haproxy_threads}, gateway CPUs {args.gateway_cpus}")
    print("  phase                      accepted/s  accepted p50    p99   refused p50    p99  "
          "gateway cores  client cores  statuses")
    for name, t in results.items():
        rate = len(t.accepted) / args.seconds
        print(f"  {name:<26} {rate:9.1f}  {ms(t.accepted, 0.5)} {ms(t.accepted, 0.99)}   "
              f"{ms(t.refused, 0.5)} {ms(t.refused, 0.99)}  {t.gateway_cpu:12.2f}  {t.client_cpu:12.2f}  "
              f"{dict(t.statuses)}")
    at_capacity = results["capacity (16 clients)"].accepted
    for name in ("4x capacity (64 clients)", "4x, honouring Retry-After"):
        over = results[name].accepted
        print(f"  {name}: accepted p50 / at capacity {statistics.median(over) / statistics.median(at_capacity):.2f}x, "
              f"p99 {quantile(over, 0.99) / quantile(at_capacity, 0.99):.2f}x")
    unexplained = [u for t in results.values() for u in t.unexplained]
    print(f"  unexplained answers: {len(unexplained)}" + (f", e.g. {unexplained[:3]}" if unexplained else ""))


if __name__ == "__main__":
    main()
