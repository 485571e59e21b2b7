"""Does hosting in a Ray worker slow a lone stream?

vLLM's own OpenAI server, started three ways on the same model directory and
engine settings: standalone (``direct``), run by a Ray actor inside the actor's
worker process (``inproc``), and started by a Ray actor as its child process
(``child``). The Ray cluster is a local one with the gateway's own settings for
task events and metrics. The three answer c=1 streams in rounds, the others
frozen (SIGSTOP) while one is measured, the order rotated each round; the
ratios to ``direct`` are per round, then summarised (median, mean and its
standard error) with each round's TTFT p50 difference.

    python -m benchmarks.ray_hosted --rounds 14 --requests 12

It measures the cost of the Ray worker process around an engine frontend
(its core worker's threads, its 10 ms signal check, the cluster's daemons),
apart from anything the gateway itself does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.servers import KV_CACHE_GIB, cpu_model, model_entry, signal_tree, start_direct, stop, tree, wait_ready
from benchmarks.stream_load import Figures, describe, load, mean_ratio

HOSTED = ("inproc", "child")


def host(mode: str, argv: list[str]) -> None:
    """Runs vLLM's server under a Ray actor until it exits (this process: the driver)."""
    os.environ.setdefault("RAY_task_events_report_interval_ms", "0")
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    import ray

    @ray.remote(num_cpus=0)
    class Host:
        async def serve(self, mode: str, argv: list[str]) -> None:
            if mode == "child":
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv
                )
                await proc.wait()
                return
            # A Ray worker's event loop runs off the main thread: vLLM's
            # server may not install signal handlers there.
            signal.signal = lambda *_a, **_k: None  # type: ignore[assignment]
            asyncio.get_running_loop().add_signal_handler = lambda *_a, **_k: None  # type: ignore[method-assign]
            from vllm.entrypoints.launchers.api_server.entry import run_server
            from vllm.entrypoints.launchers.cli_args import make_arg_parser
            from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
            from vllm.utils.argparse_utils import FlexibleArgumentParser

            cli_env_setup()
            await run_server(make_arg_parser(FlexibleArgumentParser()).parse_args(argv))

    env = {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": env})
    ray.get(Host.remote().serve.remote(mode, argv))  # type: ignore[attr-defined]


def start_hosted(mode: str, model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    from gateway.config import VLLMModelConfig
    from models.llm.vllm_engine import VLLMEngine

    engine_args = VLLMEngine(VLLMModelConfig.model_validate(model_entry(model_dir))).cli_args()
    cmd = [
        sys.executable, "-m", "benchmarks.ray_hosted", "--serve", mode, "--",
        *engine_args, "--host", "127.0.0.1", "--port", str(port),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def stop_tree(proc: subprocess.Popen) -> None:
    """Stops a server and whatever of its tree outlives it: a Ray actor's
    children are left behind when Ray stops the actor's worker."""
    processes = tree(proc)
    stop(proc)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        _, alive = psutil.wait_procs(processes[1:], timeout=1)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signum)
        processes = [proc, *alive]
    psutil.wait_procs(processes[1:], timeout=10)


def measure(servers: dict[str, tuple[subprocess.Popen, int]], args: argparse.Namespace) -> dict[str, list[Figures]]:
    names = list(servers)
    results: dict[str, list[Figures]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            for other, (proc, _) in servers.items():
                signal_tree(proc, signal.SIGCONT if other == name else signal.SIGSTOP)
            time.sleep(2)  # the frozen servers' last wake-ups pass
            url = f"http://127.0.0.1:{servers[name][1]}"
            asyncio.run(load(url, 1, 3, args.max_tokens))  # warm-up, not counted
            figures = asyncio.run(load(url, 1, args.requests, args.max_tokens))
            results[name].append(figures)
            print(f"round {r:2d} {name:<7}", describe(figures), flush=True)
    return results


def summarise(results: dict[str, list[Figures]]) -> None:
    for mode in HOSTED:
        pairs = list(zip(results[mode], results["direct"]))
        ratios = [h.tokens_per_s / d.tokens_per_s for h, d in pairs]
        mean, error = mean_ratio(ratios)
        ttft = [h.ttft_ms[0] - d.ttft_ms[0] for h, d in pairs]
        print(
            f"{mode}/direct c=1 tok/s: median {statistics.median(ratios):.3f}, "
            f"geometric mean {mean:.3f} ± {error:.3f} (rounds {min(ratios):.2f}–{max(ratios):.2f}); "
            f"TTFT p50 added: median {statistics.median(ttft):+.1f} ms ({min(ttft):+.1f} to {max(ttft):+.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path(".models/tiny-chat-v1"))
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--requests", type=int, default=12, help="c=1 requests per server per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8101, help="the first of three ports")
    parser.add_argument("--serve", choices=HOSTED, help=argparse.SUPPRESS)  # the hosting process itself
    args, rest = parser.parse_known_args()
    if args.serve:
        host(args.serve, [a for a in rest if a != "--"])
        return
    print(f"==> {cpu_model()}, {os.cpu_count()} CPUs; {args.rounds} rounds × {args.requests} requests", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="ray-hosted-"))
    servers = {"direct": (start_direct(args.model_dir, args.port, logs / "direct.log"), args.port)}
    for i, mode in enumerate(HOSTED, start=1):
        servers[mode] = (start_hosted(mode, args.model_dir, args.port + i, logs / f"{mode}.log"), args.port + i)
    try:
        for name, (proc, port) in servers.items():
            wait_ready(f"http://127.0.0.1:{port}/health", proc)
            print(f"==> {name} ready (log {logs / name}.log)", flush=True)
        summarise(measure(servers, args))
    finally:
        for proc, _ in servers.values():
            signal_tree(proc, signal.SIGCONT)
            stop_tree(proc)


if __name__ == "__main__":
    main()
