"""Streaming chat load: vLLM's own OpenAI server vs. the gateway, one run.

Starts ``python -m vllm.entrypoints.openai.api_server`` on the model directory
with the engine arguments the gateway's replica uses (``VLLMEngine.cli_args``)
and ``llm-gateway serve`` on the same directory and settings, both at once, and measures them in turn: at each concurrency level and
with each load generator, vLLM's server then the gateway, the other way round
in the next round, ``--rounds`` times. A VM's speed drifts by tens of percent
within minutes; measured seconds apart, the two see the same machine, and each
round's gateway/direct ratio is a paired comparison (printed as the median
and range of the rounds' ratios and, from four rounds on, their mean and its
standard error). A lone stream is measured in more, shorter rounds
(``--lone-rounds``, ``--lone-requests``). The server not being
measured is frozen meanwhile (SIGSTOP to its whole process tree: Ray's
daemons, replicas and engines under the gateway), so it takes no CPU from the
other; it is thawed (SIGCONT) two seconds before its own turn, and each
measurement starts with its warm-up round. ``--one-at-a-time`` runs one
server alone, then the other, instead (the drift falls between them).

Each concurrency level (1, 8 and 32 by default) is measured by two load
generators, each after a warm-up round: this module's own (aiohttp), and vLLM's
own benchmark client (``vllm bench serve``, run as a library on its random
dataset). Both report output tokens/s, time to first token and inter-token
latency, p50 and p99; ours takes TTFT at the first non-empty content delta
and ITL as the gaps between content deltas as the client reads them, and
also meters each server's CPU per output token by the role of each of its
processes, and this process's (``benchmarks/cpu_roles.py``): a line under
each of its rounds and medians. The
gateway's own overhead is measured last, on an echo model deployed into the
running gateway then (``llm-gateway deploy``; an idle model replica costs the
engines CPU, and vLLM's server has none): non-streaming chat latency at
concurrency 1 and requests/s at concurrency 32.

``--compare-relay`` adds a third server to the rounds: a second gateway with
``ingress.stream_handoff: false`` (every stream relayed by its ingress), so
that the handoff is measured against the relay in the same rounds.

``--gateway-engine-core`` sets the gateway model's ``engine_core_cpus``
(``auto``: beside its worker or where vLLM puts it, whichever it measures
faster at the load it runs; ``workers``: always beside; ``vllm``: where vLLM
puts it), and ``--direct-engine-core pinned``
moves the engine core of vLLM's own server beside its worker for good.
``--compare-engine-core MODE`` adds a gateway whose model has
``engine_core_cpus: MODE`` to the rounds (``core-MODE``), so that a placement
is measured against the gateway's in the same rounds.
``--compare-front-door DOOR`` adds a gateway whose ``runtime.http_proxy`` is
DOOR (``door-DOOR``: ``haproxy`` or ``serve``) against the default front door
(the ingress replicas themselves), likewise. ``--compare-checkout PATH`` adds
a gateway run from another source tree (``checkout``; e.g. ``git worktree
add PATH <commit>``): a change measured against the code before it.

Both servers and the load generators run in this process's session (checked
once each server is ready): Linux schedules each session as one group, and
a server in a session of its own shares a busy CPU with the load generators
as one (README, "Sessions and the scheduler").

    python -m benchmarks.streaming --model-dir .models/tiny-chat-v1
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.cpu_roles import CpuMeter
from benchmarks.cpu_roles import describe as describe_cpu
from benchmarks.servers import (
    add_echo, cpu_model, place_direct_engine_core, signal_tree, start_direct, start_gateway, stop, wait_ready,
)
from benchmarks.stream_load import Figures, describe, echo_overhead, load, mean_ratio, vllm_bench

CLIENTS = ("aiohttp", "vllm-bench")
# After a server is thawed, before it is measured: its timers catch up.
THAW_S = 2.0


def _levels(args: argparse.Namespace) -> list[tuple[int, str, int, int]]:
    """(concurrency, client, requests, rounds) in the order they are measured.

    A lone stream (concurrency 1) is measured in ``--lone-rounds`` short
    rounds of ``--lone-requests``: its rounds' ratios spread most (a VM's
    speed drifts within seconds, and one stream keeps both CPUs busy), and
    a ratio's standard error falls with the number of rounds, not their length."""
    return [
        (concurrency, client, *_size(concurrency, args))
        for concurrency in args.concurrency
        for client in CLIENTS
        if client in args.clients
    ]


def _size(concurrency: int, args: argparse.Namespace) -> tuple[int, int]:
    """(requests, rounds) at ``concurrency``."""
    if concurrency == 1 and args.lone_rounds:
        return args.lone_requests, args.lone_rounds
    return max(args.requests_per_stream * concurrency, args.min_requests), args.rounds


def _measure_once(
    base_url: str, concurrency: int, client: str, requests: int, args: argparse.Namespace,
    proc: subprocess.Popen, direct: bool,
) -> Figures:
    """One level with one client; ours also meters the CPU of ``proc``'s tree
    by role (``direct``: vLLM's own server)."""
    if client == "aiohttp":
        return asyncio.run(load(base_url, concurrency, requests, args.max_tokens, CpuMeter(proc, direct)))
    return vllm_bench(base_url, concurrency, requests, args)


def _print_round(label: str, figures: Figures) -> None:
    print(f"    {label} {describe(figures)}", flush=True)
    if figures.cpu_ms:
        print(f"    {'':{len(label)}} {describe_cpu(figures.cpu_ms)}", flush=True)


def _echo(base_url: str, proc: subprocess.Popen, log: Path) -> tuple[float, float]:
    """The echo route, on an echo model deployed into the gateway now: the
    streaming rounds compare a gateway serving the one model vLLM's server
    serves."""
    add_echo(proc, log)
    wait_ready(base_url + "/v1/models/echo", proc)
    p50, _ = asyncio.run(echo_overhead(base_url, 1, 400))
    _, rate = asyncio.run(echo_overhead(base_url, 32, 3200))
    print(f"    gateway echo route: c=1 p50 {p50:.2f} ms, c=32 {rate:.0f} req/s", flush=True)
    return p50, rate


def measure(
    name: str, proc: subprocess.Popen, base_url: str, ready_path: str, args: argparse.Namespace,
    log: Path | None = None,
) -> list[Figures]:
    """One server alone: started, measured at every level, stopped (``log``:
    the gateway's, for its echo model)."""
    try:
        print(f"==> {name}: waiting for the server", flush=True)
        wait_ready(base_url + ready_path, proc)
        if name == "vllm-direct":
            place_direct_engine_core(proc, args)
        results = []
        for concurrency, client, requests, _ in _levels(args):
            results.append(_measure_once(base_url, concurrency, client, requests, args, proc, name == "vllm-direct"))
            _print_round(name, results[-1])
        if log is not None:
            _echo(base_url, proc, log)
        return results
    finally:
        stop(proc)


@dataclass
class Paired:
    """One level and client, measured ``rounds`` times on each server
    (``direct``, ``gateway`` and, with ``--compare-relay``, ``relayed``;
    with ``--compare-engine-core``, ``core-<mode>``)."""

    runs: dict[str, list[Figures]] = field(default_factory=dict)


def side_by_side(args: argparse.Namespace) -> tuple[list[Paired], tuple[float, float]]:
    """The servers up at once, measured in turn at each level, the others
    frozen meanwhile (see the module's doc)."""

    def gateway(
        name: str, port: int, engine_core: str, handoff: bool = True, door: str | None = None,
        source: Path | None = None,
    ) -> tuple[subprocess.Popen, str, str]:
        log = args.log_dir / f"bench-{name}.log"
        proc = start_gateway(
            args.model_dir, port, log, args.gateway_cpus, engine_core, handoff, door, echo=False, source=source
        )
        return proc, f"http://127.0.0.1:{port}", "/ready"

    servers = {
        "direct": (start_direct(args.model_dir, 8101, args.log_dir / "bench-direct.log"),
                   "http://127.0.0.1:8101", "/health"),
        "gateway": gateway("gateway", 8102, args.gateway_engine_core),
    }  # fmt: skip
    if args.compare_relay:
        servers["relayed"] = gateway("relayed", 8103, args.gateway_engine_core, handoff=False)
    if args.compare_engine_core:
        servers[core_name(args)] = gateway(core_name(args), 8104, args.compare_engine_core)
    if args.compare_front_door:
        servers[door_name(args)] = gateway(door_name(args), 8105, args.gateway_engine_core, door=args.compare_front_door)
    if args.compare_checkout:
        servers["checkout"] = gateway("checkout", 8106, args.gateway_engine_core, source=args.compare_checkout)
    names = list(servers)
    try:
        for name, (proc, base_url, ready_path) in servers.items():
            print(f"==> {name}: waiting for the server", flush=True)
            wait_ready(base_url + ready_path, proc)
        place_direct_engine_core(servers["direct"][0], args)
        results = []
        for concurrency, client, requests, rounds in _levels(args):
            paired = Paired()
            for round_ in range(rounds):
                turn = round_ % len(names)  # each server first in turn
                for name in names[turn:] + names[:turn]:
                    _thaw_only(name, servers)
                    proc, base_url, _ = servers[name]
                    figures = _measure_once(base_url, concurrency, client, requests, args, proc, name == "direct")
                    paired.runs.setdefault(name, []).append(figures)
                    _print_round(f"round {round_ + 1} {name:<9}", figures)
            results.append(paired)
        _thaw_only("gateway", servers)
        echo = _echo(servers["gateway"][1], servers["gateway"][0], args.log_dir / "bench-gateway.log")
        return results, echo
    finally:
        for proc, _, _ in servers.values():
            signal_tree(proc, signal.SIGCONT)
            stop(proc)


def core_name(args: argparse.Namespace) -> str:
    """The name of the gateway ``--compare-engine-core`` adds."""
    return f"core-{args.compare_engine_core}"


def door_name(args: argparse.Namespace) -> str:
    """The name of the gateway ``--compare-front-door`` adds."""
    return f"door-{args.compare_front_door}"


def _thaw_only(name: str, servers: dict[str, tuple[subprocess.Popen, str, str]]) -> None:
    """Freezes every server but ``name``, which is thawed and given THAW_S."""
    for other, (proc, _, _) in servers.items():
        if other != name:
            signal_tree(proc, signal.SIGSTOP)
    signal_tree(servers[name][0], signal.SIGCONT)
    time.sleep(THAW_S)


def main() -> None:
    args = parse_args()
    machine = (f"model {args.model_dir}, {args.max_tokens} output tokens per request, "
               f"{os.cpu_count()} CPUs ({cpu_model()}); engine core: gateway {args.gateway_engine_core}, "
               f"vLLM's server {args.direct_engine_core}")
    if args.one_at_a_time or args.skip_direct:
        one_at_a_time(args, machine)
    else:
        report_side_by_side(args, machine)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, its combinations checked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".models/tiny-chat-v1"))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-stream", type=int, default=8,
                        help="requests per concurrent stream at each level")
    parser.add_argument("--min-requests", type=int, default=40)
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--gateway-cpus", default="off", help="the gateway's runtime.gateway_cpus")
    parser.add_argument("--gateway-engine-core", choices=("auto", "workers", "vllm"), default="auto",
                        help="the gateway model's engine_core_cpus")
    parser.add_argument("--direct-engine-core", choices=("vllm", "pinned"), default="vllm",
                        help="vLLM's own server: its engine core as vLLM leaves it, or beside its worker")
    parser.add_argument("--rounds", type=int, default=4,
                        help="both servers up, measured in turn this many times at each level")
    parser.add_argument("--lone-rounds", type=int, default=12,
                        help="rounds at concurrency 1, side by side (0: --rounds, of the usual size)")
    parser.add_argument("--lone-requests", type=int, default=12,
                        help="requests per round at concurrency 1, with --lone-rounds")
    parser.add_argument("--compare-relay", action="store_true",
                        help="also a gateway with ingress.stream_handoff off, in the same rounds")
    parser.add_argument("--compare-engine-core", choices=("auto", "workers", "vllm"),
                        help="also a gateway with this engine_core_cpus, in the same rounds")
    parser.add_argument("--compare-front-door", choices=("haproxy", "serve"),
                        help="also a gateway with this runtime.http_proxy, in the same rounds")
    parser.add_argument("--compare-checkout", type=Path,
                        help="also a gateway run from this source tree (e.g. `git worktree add` of an earlier "
                        "commit), in the same rounds")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="vLLM's server alone, then the gateway alone, --rounds times")
    parser.add_argument("--skip-direct", action="store_true",
                        help="measure the gateway only (implies --one-at-a-time)")
    args = parser.parse_args(argv)
    if args.compare_engine_core == args.gateway_engine_core:
        parser.error("--compare-engine-core must differ from --gateway-engine-core")
    if (args.compare_relay or args.compare_engine_core or args.compare_front_door or args.compare_checkout) and (
        args.one_at_a_time or args.skip_direct
    ):
        parser.error("--compare-relay, --compare-engine-core, --compare-front-door and --compare-checkout measure in shared "
                     "rounds: not with --one-at-a-time or --skip-direct")
    if args.one_at_a_time or args.skip_direct:
        args.lone_rounds = 0  # rounds of whole runs: each level at its usual size
    return args


def report_side_by_side(args: argparse.Namespace, machine: str) -> None:
    """Every server up, measured in turn round by round; medians and paired ratios."""
    results, (echo_p50, echo_rate) = side_by_side(args)
    print()
    count = 2 + sum(map(bool, (args.compare_relay, args.compare_engine_core, args.compare_front_door, args.compare_checkout)))
    servers = "both servers" if count == 2 else f"all {count} servers"
    lone = f" ({args.lone_rounds} of {args.lone_requests} requests at c=1)" if args.lone_rounds else ""
    print(f"{machine}; {servers} up, {args.rounds} rounds in turn at each level{lone}")
    print_paired(results, comparisons(args))
    print(f"gateway echo route: c=1 p50 {echo_p50:.2f} ms, c=32 {echo_rate:.0f} req/s")


def one_at_a_time(args: argparse.Namespace, machine: str) -> None:
    """vLLM's server alone, then the gateway alone, ``--rounds`` times; a table per round."""
    tables = []
    for round_ in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"==> round {round_} of {args.rounds}", flush=True)
        direct = [] if args.skip_direct else measure(
            "vllm-direct", start_direct(args.model_dir, 8101, args.log_dir / "bench-direct.log"),
            "http://127.0.0.1:8101", "/health", args,
        )
        log = args.log_dir / "bench-gateway.log"
        gateway = measure(
            "gateway",
            start_gateway(args.model_dir, 8102, log, args.gateway_cpus, args.gateway_engine_core, echo=False),
            "http://127.0.0.1:8102", "/ready", args, log,
        )
        tables.append((direct, gateway))
    for round_, (direct, gateway) in enumerate(tables, 1):
        print()
        title = f"round {round_}: " if args.rounds > 1 else ""
        print(f"{title}{machine}")
        print_table(direct, gateway)


def print_table(direct: list[Figures], gateway: list[Figures]) -> None:
    print(f"{'':25}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}")
    for d, g in zip(direct, gateway):
        for name, f in (("direct", d), ("gateway", g)):
            print(f"{f.client:<11}c={f.concurrency:<3}{name:<9}{f.tokens_per_s:8.0f}{f.ttft_ms[0]:10.1f}"
                  f"{f.ttft_ms[1]:10.1f}{f.itl_ms[0]:9.1f}{f.itl_ms[1]:9.1f}")
        print(f"{d.client:<11}c={d.concurrency:<3}{'ratio':<9}{g.tokens_per_s / d.tokens_per_s:7.2f}x"
              f"  TTFT p50 {g.ttft_ms[0] - d.ttft_ms[0]:+.1f} ms, ITL p99 "
              f"{g.itl_ms[1] / d.itl_ms[1]:.2f}x vs direct")


def _median_figures(runs: list[Figures]) -> Figures:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    return Figures(
        runs[0].client,
        runs[0].concurrency,
        med([f.tokens_per_s for f in runs]),
        (med([f.ttft_ms[0] for f in runs]), med([f.ttft_ms[1] for f in runs])),
        (med([f.itl_ms[0] for f in runs]), med([f.itl_ms[1] for f in runs])),
        med([f.end_ms for f in runs]),
        {name: med([f.cpu_ms.get(name, 0.0) for f in runs]) for name in runs[0].cpu_ms},
    )


def comparisons(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(label, server, against): the ratios ``print_paired`` prints."""
    pairs = [("ratio", "gateway", "direct"), ("relayed", "relayed", "direct"), ("handoff", "gateway", "relayed")]
    if args.compare_engine_core:
        core = core_name(args)
        pairs += [(core, core, "direct"), (f"{args.gateway_engine_core}/{args.compare_engine_core}", "gateway", core)]
    if args.compare_front_door:
        door = door_name(args)
        pairs += [(door, door, "direct"), (f"own/{args.compare_front_door}", "gateway", door)]
    if args.compare_checkout:
        pairs += [("checkout", "checkout", "direct"), ("this/checkout", "gateway", "checkout")]
    return pairs


def print_paired(results: list[Paired], pairs: list[tuple[str, str, str]]) -> None:
    """Medians over the rounds; ratios are the median (and range) of each
    round's ratio of the two servers ``pairs`` names (gateway/direct,
    relayed/direct, handoff/relayed, ...)."""
    print(f"{'medians':25}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}")
    for paired in results:
        for name, runs in paired.runs.items():
            f = _median_figures(runs)
            print(f"{f.client:<11}c={f.concurrency:<3}{name:<9}{f.tokens_per_s:8.0f}{f.ttft_ms[0]:10.1f}"
                  f"{f.ttft_ms[1]:10.1f}{f.itl_ms[0]:9.1f}{f.itl_ms[1]:9.1f}")
            if f.cpu_ms:
                print(f"{'':25}{describe_cpu(f.cpu_ms)}")
        for label, ours, theirs in pairs:
            if ours in paired.runs and theirs in paired.runs:
                _print_ratios(label, list(zip(paired.runs[theirs], paired.runs[ours])))


def _print_ratios(label: str, pairs: list[tuple[Figures, Figures]]) -> None:
    def spread(values: list[float], form: str) -> str:
        return f"{form.format(statistics.median(values))} ({form.format(min(values))}..{form.format(max(values))})"

    f = pairs[0][0]
    ratios = [g.tokens_per_s / d.tokens_per_s for d, g in pairs]
    print(f"{f.client:<11}c={f.concurrency:<3}{label:<9} "
          f"tok/s {spread(ratios, '{:.2f}x')}{_mean_and_error(ratios)}, "
          f"TTFT p50 added {spread([g.ttft_ms[0] - d.ttft_ms[0] for d, g in pairs], '{:+.1f} ms')}, "
          f"ITL p99 {spread([g.itl_ms[1] / d.itl_ms[1] for d, g in pairs], '{:.2f}x')}"
          + ("" if math.isnan(f.end_ms) else
             f", [DONE] to end added {spread([g.end_ms - d.end_ms for d, g in pairs], '{:+.2f} ms')}"))


def _mean_and_error(ratios: list[float]) -> str:
    """The rounds' geometric mean ratio and its standard error
    (``mean_ratio``), from four rounds on (fewer say too little about their
    spread)."""
    if len(ratios) < 4:
        return ""
    mean, error = mean_ratio(ratios)
    return f", mean {mean:.3f}x +- {error:.3f}"


if __name__ == "__main__":
    main()
