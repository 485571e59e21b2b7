"""models/llm/core_placement.py: the engine core moves as the count of generating requests crosses."""

from __future__ import annotations

from models.llm.core_placement import BESIDE_WORKERS_AT, CorePlacer


class Recorded:
    """A placement that records its moves."""

    def __init__(self) -> None:
        self.moves: list[str] = []

    def beside_workers(self) -> None:
        self.moves.append("beside")

    def where_vllm_left(self) -> None:
        self.moves.append("left")


def test_auto_moves_the_engine_core_beside_its_workers_only_while_several_requests_generate() -> None:
    placement = Recorded()
    placer = CorePlacer(placement, "auto")
    assert placement.moves == []  # vLLM left it where it runs with no request
    for _ in range(BESIDE_WORKERS_AT - 1):
        placer.started()
    assert placement.moves == []
    placer.started()
    assert placement.moves == ["beside"]
    placer.started()
    placer.ended()
    assert placement.moves == ["beside"]  # still several: no move
    placer.ended()
    assert placement.moves == ["beside", "left"]
    placer.started()
    assert placement.moves == ["beside", "left", "beside"]
    for _ in range(BESIDE_WORKERS_AT):
        placer.ended()
    assert placement.moves == ["beside", "left", "beside", "left"]
    assert placer.generating == 0


def test_workers_keeps_the_engine_core_beside_its_workers_whatever_runs() -> None:
    placement = Recorded()
    placer = CorePlacer(placement, "workers")
    assert placement.moves == ["beside"]
    for _ in range(BESIDE_WORKERS_AT + 1):
        placer.started()
    for _ in range(BESIDE_WORKERS_AT + 1):
        placer.ended()
    assert placement.moves == ["beside"]
