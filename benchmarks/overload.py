"""Overload: a vLLM model offered four times what it takes, in one gateway run.

``tiny-chat-v1`` (the real vLLM engine) with ``max_ongoing_requests: 8`` and
``max_queued_requests: 8``: it takes 16 requests at once. Closed-loop
clients send non-streaming chat (32 tokens each) in three phases of the same
length: 16 of them (at capacity, nothing refused), 64 (four times capacity)
that wait 100 ms after a refusal (impatient ones; not backing off at all, a
2-core machine would measure the load generator's own spin), and 64 that
wait what ``Retry-After`` says, as the OpenAI SDK's retries do. Each round
runs the three, in an order rotated from round to round: this VM's speed
drifts by tens of percent within minutes, so each overloaded phase is
compared with the capacity phase of its own round.

Reported: accepted requests' throughput and latency p50/p99 at 4x against
capacity (what overload costs the requests that are taken), the refusals'
latency, and every status seen: refusals must be 503 ``overloaded`` with
``Retry-After``, and nothing else may be 5xx.

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


PHASES = (
    ("capacity (16 clients)", CAPACITY, False),
    ("4x capacity (64 clients)", 4 * CAPACITY, False),
    ("4x, honouring Retry-After", 4 * CAPACITY, True),
)
AT_CAPACITY = PHASES[0][0]


def ms(values: list[float], q: float) -> str:
    return f"{quantile(values, q) * 1000:7.1f}" if values else "      -"


def run_rounds(base: str, pid: int, rounds: int, seconds: float) -> list[dict[str, Tally]]:
    """Each round runs every phase once, in an order rotated from round to
    round, so that the VM's drift within a run falls on each phase alike and a
    round's phases are compared with each other (a paired comparison)."""
    results: list[dict[str, Tally]] = []
    for r in range(rounds):
        shift = r % len(PHASES)
        results.append({})
        for name, clients, patient in PHASES[shift:] + PHASES[:shift]:
            gateway_before, client_before = tree_cpu(pid), time.process_time()
            results[-1][name] = tally = asyncio.run(phase(base, clients, seconds, patient))
            tally.gateway_cpu = (tree_cpu(pid) - gateway_before) / seconds
            tally.client_cpu = (time.process_time() - client_before) / seconds
    return results


def ratio_line(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def report(results: list[dict[str, Tally]], seconds: float) -> None:
    print("  round  phase                      accepted/s  accepted p50    p99   refused p50    p99  "
          "gateway cores  client cores  statuses")
    for r, round_ in enumerate(results, 1):
        for name, _, _ in PHASES:
            t = round_[name]
            print(f"  {r:5}  {name:<26} {len(t.accepted) / seconds:9.1f}  {ms(t.accepted, 0.5)} "
                  f"{ms(t.accepted, 0.99)}   {ms(t.refused, 0.5)} {ms(t.refused, 0.99)}  "
                  f"{t.gateway_cpu:12.2f}  {t.client_cpu:12.2f}  {dict(t.statuses)}")
    print("  against capacity in the same round, median (range) over the rounds:")
    for name, _, _ in PHASES[1:]:
        rate, p50, p99 = [], [], []
        for round_ in results:
            base, over = round_[AT_CAPACITY].accepted, round_[name].accepted
            rate.append(len(over) / len(base))
            p50.append(statistics.median(over) / statistics.median(base))
            p99.append(quantile(over, 0.99) / quantile(base, 0.99))
        print(f"  {name}: accepted/s {ratio_line(rate)}, p50 {ratio_line(p50)}, p99 {ratio_line(p99)}")
    unexplained = [u for round_ in results for t in round_.values() for u in t.unexplained]
    print(f"  unexplained answers: {len(unexplained)}" + (f", e.g. {unexplained[:3]}" if unexplained else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three phases (default 3)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase and round (default 20)")
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
    try:
        wait_ready(base + "/ready", proc)
        asyncio.run(phase(base, CAPACITY, 5))  # warm-up: the engine meets its batch shapes
        results = run_rounds(base, proc.pid, args.rounds, args.seconds)
    finally:
        stop(proc)
        path.unlink(missing_ok=True)
    log.unlink()  # kept when the run failed, for its reason
    print(f"\nllm-gateway overload benchmark, {cpu_model()}, {MODEL} (vLLM), non-streaming chat, "
          f"32 tokens, max_ongoing {ONGOING} + max_queued {QUEUED}, {args.rounds} rounds of "
          f"{args.seconds:.0f} s per phase, HAProxy threads {args.haproxy_threads}, gateway CPUs {args.gateway_cpus}")
    report(results, args.seconds)


if __name__ == "__main__":
    main()
