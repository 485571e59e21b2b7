"""Starting, freezing and stopping the servers the benchmarks measure:
``llm-gateway serve`` and vLLM's own OpenAI server on the same model
directory and engine settings."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.stream_load import MODEL
from gateway.affinity import place_engine_core

MAX_MODEL_LEN = 2048
KV_CACHE_GIB = 1
ECHO_MODEL = {"name": "echo", "engine": "echo", "num_cpus": 0.1}


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    """Returns once ``url`` answers 200, every process of the server then in
    this process's session (see ``in_this_session``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                in_this_session(proc)
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


def model_entry(model_dir: Path) -> dict[str, object]:
    return {
        "name": MODEL, "engine": "vllm", "model": str(model_dir.resolve()),
        "max_model_len": MAX_MODEL_LEN, "kv_cache_space_gib": KV_CACHE_GIB,
    }


def start_direct(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    from gateway.config import VLLMModelConfig
    from models.llm.vllm_engine import VLLMEngine

    engine_args = VLLMEngine(VLLMModelConfig.model_validate(model_entry(model_dir))).cli_args()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine_args,
        "--host", "127.0.0.1", "--port", str(port),
    ]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def start_gateway(
    model_dir: Path,
    port: int,
    log: Path,
    gateway_cpus: str = "off",
    engine_core: str = "auto",
    handoff: bool = True,
    http_proxy: str | None = None,
    echo: bool = True,
    source: Path | None = None,
) -> subprocess.Popen:
    """``llm-gateway serve`` on ``model_dir``, plus an echo model with
    ``echo`` (else ``add_echo`` deploys it later); ``handoff``: its
    ``ingress.stream_handoff``; ``http_proxy``: its front door (the default
    one when None); ``source``: the source tree it runs from (another
    checkout, ahead of this one's installed copy on every process's path),
    this one when None."""
    config = {
        "app_name": "bench",
        "runtime": {"gateway_cpus": gateway_cpus, **({"http_proxy": http_proxy} if http_proxy else {})},
        "ingress": {"stream_handoff": handoff},
        "models": [
            {**model_entry(model_dir), "engine_core_cpus": engine_core},
            *([ECHO_MODEL] if echo else []),
        ],
    }
    path = log.with_suffix(".yaml")  # beside its log, rewritten by the next run
    path.write_text(json.dumps(config))  # JSON is YAML
    cmd = [
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(path),
        "--host", "127.0.0.1", "--port", str(port),
    ]
    env = None
    if source is not None:  # Ray's processes inherit it from the command
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))}
    with log.open("w") as out:  # the child keeps its own copy
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=source, env=env)


def add_echo(proc: subprocess.Popen, log: Path) -> None:
    """Adds the echo model to a gateway started without one (``log``: the
    log it was started with), live: its config, beside the log, gains the
    echo model and ``llm-gateway deploy`` applies it on the gateway's own
    cluster (there may be several on the machine)."""
    path = log.with_suffix(".yaml")
    config = json.loads(path.read_text())
    config["models"].append(ECHO_MODEL)
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "gateway.cli", "deploy", "--config", str(path), "--address", gcs_address(proc)]
    with log.open("a") as out:
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=600)


def gcs_address(proc: subprocess.Popen) -> str:
    """The address of the Ray cluster a gateway started (its raylet's ``--gcs-address``)."""
    for process in tree(proc):
        with contextlib.suppress(psutil.Error):
            args = process.cmdline()
            if args and args[0].endswith("/raylet"):
                for arg in args:
                    if arg.startswith("--gcs-address="):
                        return arg.split("=", 1)[1]
    raise RuntimeError(f"no raylet under process {proc.pid}")


def place_direct_engine_core(proc: subprocess.Popen, args: argparse.Namespace) -> None:
    """vLLM's own server with its engine core beside its worker, as the
    gateway places its own (``--direct-engine-core pinned``); left as vLLM
    leaves it otherwise."""
    if args.direct_engine_core == "pinned":
        cpus = place_engine_core(proc.pid)
        print(f"==> vLLM's server: engine core on CPUs {sorted(cpus) if cpus else 'as vLLM left it'}", flush=True)


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """A server's processes: under ``llm-gateway serve`` Ray's daemons,
    replicas and engine processes too."""
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def in_this_session(proc: subprocess.Popen) -> None:
    """Raises unless every process of the server shares this process's
    session, as the load generators do. Linux schedules each session as one
    group (autogroup): a server in a session of its own shares a busy CPU
    with the load generators as one, and on 2 vCPUs vLLM's own server then
    held whole answers back (README, "Sessions and the scheduler")."""
    ours = os.getsid(0)
    for process in tree(proc):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if (theirs := os.getsid(process.pid)) != ours:
                raise RuntimeError(f"{process.cmdline()[:1]} runs in session {theirs}, not this one ({ours})")


def signal_tree(proc: subprocess.Popen, signum: int) -> None:
    for process in tree(proc):
        with contextlib.suppress(psutil.Error):
            process.send_signal(signum)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
