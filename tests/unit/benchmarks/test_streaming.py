"""How the streaming benchmark sizes its rounds, and what it compares when a
gateway with another placement or front door runs in the same rounds
(``--compare-engine-core``, ``--compare-front-door``, ``--compare-checkout``)."""

from __future__ import annotations

import argparse
import sys

import pytest

from benchmarks import stream_load, streaming
from benchmarks.cpu_roles import CpuMeter
from benchmarks.stream_load import Figures


def args(**given: object) -> argparse.Namespace:
    return argparse.Namespace(
        **{"gateway_engine_core": "auto", "compare_engine_core": None, "compare_front_door": None,
           "compare_checkout": None, **given}
    )


def figures(tokens_per_s: float, ttft_p50: float = 10.0, itl_p99: float = 5.0) -> Figures:
    return Figures("aiohttp", 8, tokens_per_s, (ttft_p50, 20.0), (2.0, itl_p99))


def test_a_compared_placement_is_set_against_vllms_server_and_the_gateway() -> None:
    pairs = streaming.comparisons(args(compare_engine_core="vllm"))

    assert ("core-vllm", "core-vllm", "direct") in pairs
    assert ("auto/vllm", "gateway", "core-vllm") in pairs
    assert not any("core-vllm" in pair for pair in streaming.comparisons(args()))


def test_a_compared_front_door_is_set_against_vllms_server_and_the_default_one() -> None:
    pairs = streaming.comparisons(args(compare_front_door="haproxy"))

    assert ("door-haproxy", "door-haproxy", "direct") in pairs
    assert ("own/haproxy", "gateway", "door-haproxy") in pairs
    assert not any("door-haproxy" in pair for pair in streaming.comparisons(args()))


def test_a_compared_checkout_is_set_against_vllms_server_and_this_one() -> None:
    pairs = streaming.comparisons(args(compare_checkout="/tmp/before"))

    assert ("checkout", "checkout", "direct") in pairs
    assert ("this/checkout", "gateway", "checkout") in pairs
    assert not any("checkout" in pair for pair in streaming.comparisons(args()))


def test_each_rounds_ratio_is_taken_between_the_named_servers(capsys: pytest.CaptureFixture[str]) -> None:
    paired = streaming.Paired({
        "direct": [figures(100), figures(100), figures(100)],
        "gateway": [figures(90, ttft_p50=12.0), figures(95, ttft_p50=13.0), figures(80, ttft_p50=11.0)],
        "core-vllm": [figures(60, itl_p99=10.0), figures(50, itl_p99=10.0), figures(70, itl_p99=10.0)],
    })  # fmt: skip

    streaming.print_paired([paired], streaming.comparisons(args(compare_engine_core="vllm")))

    out = capsys.readouterr().out.splitlines()
    lines = {line.split()[2]: line for line in out if line.startswith("aiohttp") and "tok/s" in line}
    # Per round, gateway/direct: 0.90, 0.95, 0.80; core-vllm/direct: 0.60,
    # 0.50, 0.70; gateway/core-vllm: 1.50, 1.90, 1.14.
    assert "tok/s 0.90x (0.80x..0.95x)" in lines["ratio"]
    assert "TTFT p50 added +2.0 ms (+1.0 ms..+3.0 ms)" in lines["ratio"]
    assert "tok/s 0.60x (0.50x..0.70x)" in lines["core-vllm"]
    assert "tok/s 1.50x (1.14x..1.90x)" in lines["auto/vllm"]
    assert "ITL p99 0.50x" in lines["auto/vllm"]
    assert "relayed" not in lines and "handoff" not in lines  # no relayed gateway ran


@pytest.mark.parametrize(
    "given",
    [
        ["--compare-engine-core", "auto"],  # the gateway's own placement
        ["--compare-engine-core", "vllm", "--one-at-a-time"],  # no shared rounds to compare in
        ["--compare-relay", "--skip-direct"],
        ["--compare-front-door", "haproxy", "--one-at-a-time"],
        ["--compare-front-door", "gateway"],  # the default front door itself
    ],
)
def test_a_comparison_that_cannot_be_made_is_refused(given: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*_: object) -> None:
        raise AssertionError("a server was started")

    monkeypatch.setattr(sys, "argv", ["streaming", *given])
    monkeypatch.setattr(streaming, "start_direct", started)
    monkeypatch.setattr(streaming, "start_gateway", started)

    with pytest.raises(SystemExit) as refused:
        streaming.main()

    assert refused.value.code == 2


def test_a_lone_stream_is_measured_in_more_shorter_rounds() -> None:
    given = args(concurrency=[1, 8], clients=["aiohttp"], requests_per_stream=8, min_requests=40, rounds=3,
                 lone_rounds=12, lone_requests=10)

    assert streaming._levels(given) == [(1, "aiohttp", 10, 12), (8, "aiohttp", 64, 3)]
    given.lone_rounds = 0
    assert streaming._levels(given)[0] == (1, "aiohttp", 40, 3)


def test_four_rounds_or_more_also_give_the_geometric_mean_ratio_and_its_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    paired = streaming.Paired({
        "direct": [figures(100)] * 4,
        "gateway": [figures(90), figures(100), figures(80), figures(110)],
    })  # fmt: skip

    streaming.print_paired([paired], streaming.comparisons(args()))

    line = next(line for line in capsys.readouterr().out.splitlines() if " ratio " in line)
    # Ratios 0.9, 1.0, 0.8, 1.1: geometric mean 0.943 (the plain mean, 0.950,
    # leans high), sample sd of the logs 0.137, its error 0.943 * 0.137 / 2.
    assert "tok/s 0.95x (0.80x..1.10x), mean 0.943x +- 0.065" in line


def test_the_mean_ratio_of_two_alike_servers_is_one() -> None:
    mean, error = stream_load.mean_ratio([0.8, 1.25, 0.5, 2.0])

    assert mean == pytest.approx(1.0)
    assert error > 0.2


def test_the_default_rounds_put_each_server_first_equally_often() -> None:
    assert streaming.parse_args([]).rounds % 2 == 0


@pytest.mark.parametrize("given", [["--one-at-a-time"], ["--skip-direct"]])
def test_whole_runs_measure_a_lone_stream_at_the_usual_size(given: list[str]) -> None:
    assert streaming.parse_args(given).lone_rounds == 0
    assert streaming.parse_args([]).lone_rounds == 12  # side by side: more, shorter rounds


def test_each_server_is_metered_with_vllms_api_server_as_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Side by side, only vLLM's server's root process is its API server (``direct``): the gateway's is background."""
    procs = {"direct": object(), "gateway": object()}
    metered: dict[object, bool] = {}

    async def measured(base_url: str, concurrency: int, requests: int, max_tokens: int, meter: CpuMeter) -> Figures:
        metered[meter._proc] = meter._direct
        return figures(100)

    monkeypatch.setattr(streaming, "start_direct", lambda *_: procs["direct"])
    monkeypatch.setattr(streaming, "start_gateway", lambda *_, **__: procs["gateway"])
    for name in ("wait_ready", "place_direct_engine_core", "signal_tree", "stop"):
        monkeypatch.setattr(streaming, name, lambda *_, **__: None)
    monkeypatch.setattr(streaming, "_echo", lambda *_: (1.0, 1000.0))
    monkeypatch.setattr(streaming, "THAW_S", 0.0)
    monkeypatch.setattr(streaming, "load", measured)

    given = streaming.parse_args(["--concurrency", "1", "--clients", "aiohttp", "--lone-rounds", "2"])
    results, _ = streaming.side_by_side(given)

    assert metered == {procs["direct"]: True, procs["gateway"]: False}
    assert set(results[0].runs) == {"direct", "gateway"}
