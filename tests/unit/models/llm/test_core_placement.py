"""models/llm/core_placement.py: the engine core runs where it measures making tokens faster."""

from __future__ import annotations

import logging

import pytest

from models.llm.core_placement import PROBE_EVERY, SAMPLES, WINDOW_S, CorePlacer


class Recorded:
    """A placement that records its moves."""

    def __init__(self) -> None:
        self.moves: list[str] = []

    def beside_workers(self) -> None:
        self.moves.append("beside")

    def where_vllm_left(self) -> None:
        self.moves.append("left")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def engine(streams: int, beside_rate: float, left_rate: float) -> tuple[CorePlacer, Recorded, Clock]:
    """A placer with ``streams`` generating, on an engine that makes tokens
    at ``beside_rate``/``left_rate`` per second in each place."""
    placement, clock = Recorded(), Clock()
    placer = CorePlacer(placement, "auto", clock)
    for _ in range(streams):
        placer.started()
    placer.rates = (beside_rate, left_rate)  # type: ignore[attr-defined]
    return placer, placement, clock


def run_windows(placer: CorePlacer, clock: Clock, windows: int) -> list[bool]:
    """Runs ``windows`` windows, each's tokens at the rate of the place it ran in; returns those places."""
    beside_rate, left_rate = placer.rates  # type: ignore[attr-defined]
    places = []
    for _ in range(windows):
        places.append(placer.beside)
        clock.now += WINDOW_S
        placer.produced(int((beside_rate if placer.beside else left_rate) * WINDOW_S))
    return places


def test_with_several_streams_both_places_are_measured_then_the_faster_kept_and_the_other_probed() -> None:
    placer, placement, clock = engine(8, beside_rate=1_000, left_rate=1_200)
    learning = run_windows(placer, clock, 2 * SAMPLES)
    assert learning.count(True) == learning.count(False) == SAMPLES  # alternating while learning
    settled = run_windows(placer, clock, 3 * PROBE_EVERY)
    assert settled.count(True) == 3 and not any(settled[:PROBE_EVERY - 1])  # one probe in eight, else left
    placer.rates = (1_500, 1_200)  # type: ignore[attr-defined]  # the host changed: beside now wins
    changed = run_windows(placer, clock, 4 * PROBE_EVERY * SAMPLES)
    assert changed[-PROBE_EVERY:].count(True) == PROBE_EVERY - 1
    assert placement.moves[-1] == "beside"


def test_the_winner_is_kept_per_load() -> None:
    """Two streams and thirty-two are measured apart: beside the workers can
    lose at one load and win at another."""
    placer, _, clock = engine(2, beside_rate=400, left_rate=500)
    run_windows(placer, clock, 2 * SAMPLES + PROBE_EVERY)
    for _ in range(30):
        placer.started()
    placer.rates = (7_000, 5_000)  # type: ignore[attr-defined]
    clock.now += WINDOW_S
    placer.produced(1)  # a window that straddled the change: filed under its mean load
    run_windows(placer, clock, 2 * SAMPLES + PROBE_EVERY)
    assert run_windows(placer, clock, PROBE_EVERY - 1).count(True) >= PROBE_EVERY - 2
    for _ in range(30):
        placer.ended()
    placer.rates = (400, 500)  # type: ignore[attr-defined]
    assert run_windows(placer, clock, PROBE_EVERY - 1).count(False) >= PROBE_EVERY - 2


def test_a_lone_request_runs_where_vllm_left_it_and_is_not_measured() -> None:
    placer, placement, clock = engine(1, beside_rate=2_000, left_rate=400)
    assert set(run_windows(placer, clock, 3 * PROBE_EVERY)) == {False}
    assert placement.moves == []


def test_the_engine_core_goes_back_where_vllm_left_it_when_no_request_generates() -> None:
    placer, placement, clock = engine(4, beside_rate=2_000, left_rate=400)
    run_windows(placer, clock, 1)  # the first window ran where vLLM left it: the next runs beside
    assert placer.beside
    for _ in range(4):
        placer.ended()
    assert placement.moves[-1] == "left" and not placer.beside and placer.generating == 0
    clock.now += 60  # idle time is no window's: the next starts with the next request
    placer.started()
    placer.produced(5)
    assert not placer.beside


def test_a_window_closes_only_after_its_time() -> None:
    placer, placement, clock = engine(4, beside_rate=2_000, left_rate=400)
    for _ in range(100):
        clock.now += WINDOW_S / 200
        placer.produced(1)
    assert placement.moves == []
    clock.now = 100.0 + WINDOW_S
    placer.produced(1)
    assert placement.moves == ["beside"]


def test_workers_keeps_the_engine_core_beside_its_workers_whatever_runs() -> None:
    placement, clock = Recorded(), Clock()
    placer = CorePlacer(placement, "workers", clock)
    assert placement.moves == ["beside"]
    for _ in range(3):
        placer.started()
    for _ in range(10):
        clock.now += WINDOW_S
        placer.produced(10)
    for _ in range(3):
        placer.ended()
    assert placement.moves == ["beside"] and placer.beside


def test_where_a_load_runs_is_logged_once_decided_and_quietly_when_it_changes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="models.llm.core_placement")
    placer, _, clock = engine(8, beside_rate=1_000, left_rate=1_200)
    run_windows(placer, clock, 2 * SAMPLES + PROBE_EVERY)
    decided = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert decided == [
        (
            logging.INFO,
            "with about 8 requests generating, vLLM's engine core runs where vLLM left it (tokens/s beside its "
            "workers 1000, where vLLM left it 1200: means of the last 4 windows of 0.5 s)",
        )
    ]
    placer.rates = (2_000, 1_200)  # type: ignore[attr-defined]
    run_windows(placer, clock, 4 * PROBE_EVERY)
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.DEBUG]
    assert "runs beside its workers" in caplog.records[-1].getMessage()


def test_a_burst_after_a_lull_goes_where_its_load_measured_faster_at_once() -> None:
    placer, placement, clock = engine(32, beside_rate=7_000, left_rate=5_000)
    run_windows(placer, clock, 2 * SAMPLES + 1)
    for _ in range(32):
        placer.ended()
    assert placement.moves[-1] == "left"
    clock.now += 10
    for _ in range(8):
        placer.started()
    assert not placer.beside  # 8 streams: a load not measured yet
    for _ in range(24):
        placer.started()
    assert placer.beside and placement.moves[-1] == "beside"  # before any window closed
    run_windows(placer, clock, 1)
    assert placer.beside


def test_a_burst_stays_where_vllm_left_it_where_its_load_measured_faster_there() -> None:
    placer, placement, clock = engine(32, beside_rate=5_000, left_rate=7_000)
    run_windows(placer, clock, 2 * SAMPLES + 1)
    for _ in range(32):
        placer.ended()
    moves = list(placement.moves)
    for _ in range(32):
        placer.started()
    assert placement.moves == moves and not placer.beside
