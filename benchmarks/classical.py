"""Classical models: batched vs. unbatched, embeddings and iris, one run.

Starts one ``llm-gateway serve`` with each model twice, the same weights
behind both: batched (``max_batch_size`` 64, no batch wait: a batch is what
queued while the last one ran, and the ingress gathers requests into shared
calls) and unbatched (``max_batch_size: 1``, call by call); MiniLM once more
per dtype asked for (``float32`` and ``auto``, which is bfloat16 on CPUs with
bf16 instructions). Then, per model and concurrency level, it loads each
version in turn (never two at once) and prints throughput, p50/p99 latency
and the batched/unbatched throughput ratio.

Each request carries one instance: one sentence for MiniLM
(``/v1/embeddings``), one row of features for iris (KServe predict).

    python -m benchmarks.classical
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.servers import stop, wait_ready

BATCHED = {"max_batch_size": 64, "batch_wait_timeout_s": 0.0, "max_ongoing_requests": 256}
UNBATCHED = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0, "max_ongoing_requests": 256}
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly box".split()


@dataclass
class Result:
    concurrency: int
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def embedding_request(i: int) -> tuple[str, dict[str, Any]]:
    sentence = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(10)) + f" {i}"
    return "/v1/embeddings", {"input": sentence, "encoding_format": "float"}


def iris_request(i: int) -> tuple[str, dict[str, Any]]:
    row = [4.5 + (i % 30) / 10, 2.0 + (i % 20) / 10, 1.0 + (i % 50) / 10, 0.1 + (i % 25) / 10]
    return "/v1/models/{model}:predict", {"instances": [row]}


async def load(
    base_url: str, model: str, make: Callable[[int], tuple[str, dict[str, Any]]], concurrency: int, requests: int
) -> Result:
    # aiohttp, not httpx: on this machine httpx's pool tops out near 240
    # requests/s at 64 connections (900 at 16), even against a bare uvicorn app;
    # aiohttp serves 13,000/s there, so it measures the gateway, not the client.
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(base_url, connector=connector) as client:

        async def one(i: int) -> float:
            path, body = make(i)
            if "{model}" in path:
                path = path.format(model=model)
            else:
                body = {**body, "model": model}
            started = time.perf_counter()
            async with client.post(path, json=body) as response:
                response.raise_for_status()
                await response.read()
            return time.perf_counter() - started

        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm-up, not measured
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        result = Result(concurrency)

        async def worker() -> None:
            while not queue.empty():
                result.latencies_s.append(await one(queue.get_nowait()))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - started
    return result


def start_gateway(models_dir: Path, port: int, log: Path, threads: int | None, dtypes: list[str]) -> Any:
    import subprocess

    models = []
    for suffix, settings in (("batched", BATCHED), ("unbatched", UNBATCHED)):
        for dtype in dtypes:
            models.append({
                "name": f"minilm-{dtype}-{suffix}", "engine": "sentence-transformers",
                "model": str((models_dir / "all-minilm-l6-v2").resolve()), "num_cpus": 0.25,
                "num_threads": threads, "dtype": dtype, **settings,
            })
        models.append({
            "name": f"iris-{suffix}", "engine": "sklearn",
            "model": str((models_dir / "iris").resolve()), "num_cpus": 0.25, **settings,
        })
    path = log.with_suffix(".yaml")  # beside its log, rewritten by the next run
    path.write_text(json.dumps({"app_name": "bench-classical", "models": models}))  # JSON is YAML
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path(".models"))
    parser.add_argument("--requests", type=int, default=20, help="requests per unit of concurrency (at least 100)")
    parser.add_argument("--threads", type=int, default=None, help="MiniLM's torch threads (default: Ray's, 1 here)")
    parser.add_argument("--dtypes", default="float32,auto", help="MiniLM dtypes, comma-separated")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    from models.classical.embedding import resolve_dtype

    dtypes = args.dtypes.split(",")
    base_url = "http://127.0.0.1:8103"
    proc = start_gateway(args.models_dir, 8103, args.log_dir / "bench-classical.log", args.threads, dtypes)
    rows = []
    try:
        print("==> waiting for the gateway", flush=True)
        wait_ready(base_url + "/ready", proc)
        loads = [(f"minilm-{dtype}", embedding_request) for dtype in dtypes] + [("iris", iris_request)]
        for model, make in loads:
            for concurrency in (1, 16, 64):
                requests = max(100, args.requests * concurrency)
                pair = {}
                for version in ("unbatched", "batched"):
                    result = asyncio.run(load(base_url, f"{model}-{version}", make, concurrency, requests))
                    print(f"    {model}-{version} c={concurrency}: {result.per_s:7.0f} req/s  "
                          f"p50 {result.ms(0.5):6.1f} ms  p99 {result.ms(0.99):6.1f} ms", flush=True)
                    pair[version] = result
                rows.append((model, concurrency, pair["unbatched"], pair["batched"]))
    finally:
        stop(proc)
    print()
    print(f"one instance per request; batched: max_batch_size {BATCHED['max_batch_size']}, "
          f"wait {BATCHED['batch_wait_timeout_s'] * 1000:g} ms; MiniLM threads {args.threads or 'Ray default'}; "
          f"MiniLM auto dtype here: {resolve_dtype('auto', 'cpu')}; {os.cpu_count()} CPUs")
    print(f"{'':22}{'unbatched req/s':>16}{'p50':>8}{'p99':>8}{'batched req/s':>15}{'p50':>8}{'p99':>8}{'ratio':>8}")
    for model, concurrency, off, on in rows:
        print(f"{model:<16}c={concurrency:<4}{off.per_s:16.0f}{off.ms(0.5):8.1f}{off.ms(0.99):8.1f}"
              f"{on.per_s:15.0f}{on.ms(0.5):8.1f}{on.ms(0.99):8.1f}{on.per_s / off.per_s:7.2f}x")


if __name__ == "__main__":
    main()
