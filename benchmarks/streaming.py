"""Streaming chat load: vLLM's own OpenAI server vs. the gateway, one run.

Starts ``python -m vllm.entrypoints.openai.api_server`` on the model
directory, measures it, stops it; then starts ``llm-gateway serve`` on the same
directory with the same engine settings, measures it, stops it; prints both and
the gateway/direct ratios. Only one server runs at a time, so neither competes
with the other for the machine's cores.

Per concurrency level it reports output tokens/s (all tokens over wall time),
time to first token (first non-empty content delta) and inter-token latency
(gaps between successive content deltas as the client sees them), p50 and p99.

    python -m benchmarks.streaming --model-dir .models/tiny-chat-v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

MODEL = "tiny-chat-v1"
MAX_MODEL_LEN = 2048
KV_CACHE_GIB = 1


@dataclass
class Sample:
    ttft_s: float
    gaps_s: list[float]
    tokens: int


@dataclass
class Result:
    concurrency: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s

    def ttft_ms(self, q: float) -> float:
        return _quantile([s.ttft_s for s in self.samples], q) * 1000

    def itl_ms(self, q: float) -> float:
        return _quantile([g for s in self.samples for g in s.gaps_s], q) * 1000


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_stream(client: aiohttp.ClientSession, url: str, max_tokens: int, i: int) -> Sample:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Tell story number {i} about the harbour."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "stream": True,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    arrivals: list[float] = []
    buffer = b""
    async with client.post(url, json=body) as response:
        response.raise_for_status()
        async for raw in response.content.iter_any():
            now = time.perf_counter()
            buffer += raw
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                data = frame.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                for choice in json.loads(data).get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        arrivals.append(now)
    if not arrivals:
        raise RuntimeError("stream produced no tokens")
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return Sample(ttft_s=arrivals[0] - started, gaps_s=gaps, tokens=len(arrivals))


async def load(base_url: str, concurrency: int, requests: int, max_tokens: int) -> Result:
    url = base_url + "/v1/chat/completions"
    # aiohttp, not httpx: httpx's pool, not the server, limits load at high
    # concurrency on this machine (see benchmarks/classical.py).
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency + 4)) as client:
        # Warm-up at the measured concurrency (not measured): the engine meets
        # its batch shapes here, not in the timed part.
        await asyncio.gather(*(one_stream(client, url, 16, i) for i in range(concurrency)))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        result = Result(concurrency=concurrency, wall_s=0.0)

        async def worker() -> None:
            while not queue.empty():
                result.samples.append(await one_stream(client, url, max_tokens, queue.get_nowait()))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - started
    return result


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_direct(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", MODEL,
        "--max-model-len", str(MAX_MODEL_LEN), "--host", "127.0.0.1", "--port", str(port),
    ]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def start_gateway(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    config = {
        "app_name": "bench",
        "models": [
            {
                "name": MODEL, "engine": "vllm", "model": str(model_dir.resolve()),
                "max_model_len": MAX_MODEL_LEN, "kv_cache_space_gib": KV_CACHE_GIB,
            }
        ],
    }
    path = Path(tempfile.mkstemp(suffix=".yaml")[1])
    path.write_text(json.dumps(config))  # JSON is YAML
    cmd = [
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(path),
        "--host", "127.0.0.1", "--port", str(port),
    ]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def measure(name: str, proc: subprocess.Popen, base_url: str, ready_path: str, args: argparse.Namespace) -> list[Result]:
    try:
        print(f"==> {name}: waiting for the server", flush=True)
        wait_ready(base_url + ready_path, proc)
        results = []
        for concurrency, requests in ((1, args.requests_c1), (32, args.requests_c32)):
            result = asyncio.run(load(base_url, concurrency, requests, args.max_tokens))
            print(f"    {name} c={concurrency}: {describe(result)}", flush=True)
            results.append(result)
        return results
    finally:
        stop(proc)


def describe(r: Result) -> str:
    return (
        f"{r.tokens_per_s:7.0f} tok/s  TTFT p50 {r.ttft_ms(0.5):6.1f} ms p99 {r.ttft_ms(0.99):6.1f} ms"
        f"  ITL p50 {r.itl_ms(0.5):5.1f} ms p99 {r.itl_ms(0.99):5.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".models/tiny-chat-v1"))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-c1", type=int, default=40)
    parser.add_argument("--requests-c32", type=int, default=256)
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    from gateway.config import ModelConfig

    defaults = ModelConfig(name=MODEL, engine="echo")

    direct = measure(
        "vllm-direct", start_direct(args.model_dir, 8101, args.log_dir / "bench-direct.log"),
        "http://127.0.0.1:8101", "/health", args,
    )
    gateway = measure(
        "gateway",
        start_gateway(args.model_dir, 8102, args.log_dir / "bench-gateway.log"),
        "http://127.0.0.1:8102", "/ready", args,
    )
    print()
    print(f"model {args.model_dir}, {args.max_tokens} output tokens per request, "
          f"gateway stream budget {defaults.stream_messages_per_s:g} msg/s, "
          f"max hold {defaults.stream_max_hold_ms:g} ms, {os.cpu_count()} CPUs")
    print(f"{'':14}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}")
    for d, g in zip(direct, gateway):
        for name, r in (("direct", d), ("gateway", g)):
            print(f"c={r.concurrency:<3}{name:<10}{r.tokens_per_s:8.0f}{r.ttft_ms(0.5):10.1f}"
                  f"{r.ttft_ms(0.99):10.1f}{r.itl_ms(0.5):9.1f}{r.itl_ms(0.99):9.1f}")
        print(f"c={d.concurrency:<3}{'ratio':<10}{g.tokens_per_s / d.tokens_per_s:8.2f}x"
              f"  TTFT p50 {g.ttft_ms(0.5) - d.ttft_ms(0.5):+.1f} ms vs direct")


if __name__ == "__main__":
    main()
