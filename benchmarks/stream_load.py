"""The streaming load generator the benchmarks share: closed-loop streaming
chat clients (aiohttp) that time each content delta as they read it, vLLM's
own benchmark client (``vllm bench serve``) run as a library, and the echo
route's overhead."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field

import aiohttp

from benchmarks.cpu_roles import CpuMeter

MODEL = "tiny-chat-v1"


@dataclass
class Sample:
    ttft_s: float
    gaps_s: list[float]
    tokens: int
    end_s: float  # from the last frame's arrival to the body's end (when the client is done)


@dataclass
class Figures:
    """One load generator's figures at one concurrency."""

    client: str
    concurrency: int
    tokens_per_s: float
    ttft_ms: tuple[float, float]  # p50, p99
    itl_ms: tuple[float, float]
    end_ms: float = float("nan")  # p50 of Sample.end_s (this repository's client only)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU per output token by role (cpu_roles), where metered


@dataclass
class Result:
    concurrency: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)

    def figures(self) -> Figures:
        ttft = [s.ttft_s for s in self.samples]
        gaps = [g for s in self.samples for g in s.gaps_s]
        return Figures(
            "aiohttp",
            self.concurrency,
            sum(s.tokens for s in self.samples) / self.wall_s,
            (quantile(ttft, 0.5) * 1000, quantile(ttft, 0.99) * 1000),
            (quantile(gaps, 0.5) * 1000, quantile(gaps, 0.99) * 1000),
            quantile([s.end_s for s in self.samples], 0.5) * 1000,
        )


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile, interpolated between the two nearest values (as
    numpy's default, which vLLM's client uses): p99 of a few dozen samples is
    not their maximum."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    at = q * (len(ordered) - 1)
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def mean_ratio(ratios: list[float]) -> tuple[float, float]:
    """The rounds' mean ratio and its standard error, on the log scale
    (geometric mean): the plain mean of ratios leans above one when two
    servers are alike (r and 1/r average to more than 1), by about half the
    rounds' variance."""
    logs = [math.log(r) for r in ratios]
    mean = math.exp(statistics.mean(logs))
    error = mean * statistics.stdev(logs) / len(logs) ** 0.5 if len(logs) > 1 else float("nan")
    return mean, error


async def one_stream(client: aiohttp.ClientSession, url: str, max_tokens: int, i: int) -> Sample:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Tell story number {i} about the harbour."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    started = time.perf_counter()
    arrivals: list[float] = []
    buffer = b""
    done: float | None = None
    tokens = 0
    async with client.post(url, json=body) as response:
        response.raise_for_status()
        async for raw in response.content.iter_any():
            now = time.perf_counter()
            buffer += raw
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                data = frame.removeprefix(b"data: ")
                if data == b"[DONE]":
                    done = now
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"stream failed: {chunk['error']}")
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        arrivals.append(now)
        ended = time.perf_counter()  # the body's end: the stream is over for its client
    return _sample(started, arrivals, tokens, done, ended, max_tokens)


def _sample(started: float, arrivals: list[float], tokens: int, done: float | None, ended: float,
            max_tokens: int) -> Sample:
    """A whole stream's sample; a stream cut short, or without its ``[DONE]``,
    fails the run rather than being timed as one. Tokens are the answer's
    usage: a message may carry several when the server reads its engine late."""
    if done is None or not arrivals or tokens != max_tokens:
        raise RuntimeError(f"stream incomplete: {tokens} of {max_tokens} tokens, [DONE] {done is not None}")
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return Sample(ttft_s=arrivals[0] - started, gaps_s=gaps, tokens=tokens, end_s=ended - done)


def _session(concurrency: int, headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    # aiohttp, not httpx: httpx's pool, not the server, limits load at high
    # concurrency on this machine (see benchmarks/classical.py).
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=120), connector=connector, headers=headers
    )


async def load(
    base_url: str, concurrency: int, requests: int, max_tokens: int, meter: CpuMeter | None = None
) -> Figures:
    """Closed-loop streams at ``concurrency``, after a warm-up round;
    ``meter`` times the servers' and this process's CPU over the timed part."""
    url = base_url + "/v1/chat/completions"
    async with _session(concurrency) as client:
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

        if meter is not None:
            meter.start()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - started
        if meter is not None:
            meter.stop()
    figures = result.figures()
    if meter is not None:
        figures.cpu_ms = meter.per_token_ms(sum(s.tokens for s in result.samples))
    return figures


def vllm_bench(base_url: str, concurrency: int, requests: int, args: argparse.Namespace) -> Figures:
    """vLLM's own client (``vllm bench serve``) on its random dataset; its own
    printout goes to the log directory."""
    from vllm.benchmarks import serve as bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    bench.add_cli_args(parser)
    options = parser.parse_args([
        "--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
        "--model", MODEL, "--tokenizer", str(args.model_dir), "--dataset-name", "random",
        "--random-input-len", "16", "--random-output-len", str(args.max_tokens), "--ignore-eos",
        "--num-prompts", str(requests), "--max-concurrency", str(concurrency),
        "--num-warmups", str(concurrency), "--percentile-metrics", "ttft,itl",
        "--metric-percentiles", "50,99", "--disable-tqdm", "--temperature", "0.8",
    ])  # fmt: skip
    with (args.log_dir / "bench-vllm-client.log").open("a") as log, contextlib.redirect_stdout(log):
        result = bench.main(options)
    whole = (result["completed"], result["failed"], result["total_output_tokens"])
    if whole != (requests, 0, requests * args.max_tokens):
        raise RuntimeError(f"vLLM's client: completed, failed, output tokens {whole}, not ({requests}, 0, "
                           f"{requests * args.max_tokens})")
    return Figures(
        "vllm-bench",
        concurrency,
        float(result["output_throughput"]),
        (float(result["median_ttft_ms"]), float(result["p99_ttft_ms"])),
        (float(result["median_itl_ms"]), float(result["p99_itl_ms"])),
    )


async def echo_overhead(
    base_url: str, concurrency: int, requests: int, headers: dict[str, str] | None = None
) -> tuple[float, float]:
    """Non-streaming chat to the echo model: (p50 latency ms, requests/s)."""
    url = base_url + "/v1/chat/completions"
    body = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 3}
    latencies: list[float] = []
    async with _session(concurrency, headers) as client:

        async def one() -> None:
            started = time.perf_counter()
            async with client.post(url, json=body) as response:
                response.raise_for_status()
                await response.read()
            latencies.append(time.perf_counter() - started)

        async def worker(count: int) -> None:
            for _ in range(count):
                await one()

        await asyncio.gather(*(worker(5) for _ in range(concurrency)))  # warm-up
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return statistics.median(latencies) * 1000, len(latencies) / wall


def describe(f: Figures) -> str:
    return (
        f"{f.client:<11} c={f.concurrency:<3}{f.tokens_per_s:7.0f} tok/s  TTFT p50 {f.ttft_ms[0]:6.1f} ms "
        f"p99 {f.ttft_ms[1]:6.1f} ms  ITL p50 {f.itl_ms[0]:5.1f} ms p99 {f.itl_ms[1]:5.1f} ms"
        + ("" if math.isnan(f.end_ms) else f"  [DONE] to end p50 {f.end_ms:.3f} ms")
    )
