"""benchmarks/token_layers.py: both passes deliver every token as a whole
chunk, and a pass that loses one fails rather than being timed."""

from __future__ import annotations

import pytest
import uvloop

from benchmarks import token_layers
from models.llm.handoff import ClientSocket


def test_both_passes_deliver_every_token_whole_and_are_timed() -> None:
    figures = token_layers.measure(200, 1)  # (one that does not raises: the next test)

    assert set(figures) == {"bare", "gateway"}
    assert all(len(values) == 1 and values[0] > 0 for values in figures.values())


def test_a_pass_that_loses_a_chunk_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    written = ClientSocket.write
    seen = [0]

    def losing_the_first(self: ClientSocket, data: bytes) -> None:
        seen[0] += 1
        if seen[0] > 1:
            written(self, data)

    monkeypatch.setattr(ClientSocket, "write", losing_the_first)

    with pytest.raises(RuntimeError, match="bytes arrived"):
        uvloop.run(token_layers.one(50, ours=True))
