"""models/llm/vllm_streams.py: vLLM's outputs counted and timed into the request's tally."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.metrics.families import ITL_BUCKETS
from models.llm.core_placement import BESIDE_WORKERS_AT, CorePlacer
from models.llm.tally import GenerationTally
from models.llm.vllm_streams import count
from tests.unit.models.llm.test_core_placement import Recorded


def output(token_counts: list[int], stats: Any = None, prompt: int = 7) -> Any:
    seqs = [SimpleNamespace(index=i, token_ids=[0] * n) for i, n in enumerate(token_counts)]
    return SimpleNamespace(prompt_token_ids=[0] * prompt, outputs=seqs, metrics=stats)


def stats(first_ts: float, last_ts: float, arrival: float = 1000.0, latency: float = 0.25) -> Any:
    return SimpleNamespace(
        first_token_ts=first_ts, last_token_ts=last_ts, arrival_time=arrival, first_token_latency=latency
    )


async def source(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def drain(outputs: AsyncIterator[Any]) -> None:
    async for _ in outputs:
        pass


async def test_a_delta_stream_counts_each_step() -> None:
    tally = GenerationTally(started=1000.0)
    steps = [output([1], stats(50.0, 50.0)), output([1], stats(50.0, 50.02)), output([2], stats(50.0, 50.06))]
    await drain(count(source(steps), tally, delta=True))
    outcome = tally.outcome()
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 4)
    assert outcome.first_token_s == pytest.approx(0.25)
    # Three gaps of 20 ms, bucketed here (0.01 < 0.02 <= 0.025: the second bucket).
    assert outcome.inter_token_counts == (0, 3) + (0,) * (len(ITL_BUCKETS) - 1)
    assert outcome.inter_token_sum_s == pytest.approx(0.06)


async def test_a_final_only_answer_spreads_its_tokens_between_first_and_last() -> None:
    tally = GenerationTally(started=999.9)
    await drain(count(source([output([5, 3], stats(10.0, 10.4))]), tally, delta=False))
    outcome = tally.outcome()
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 8)
    assert outcome.first_token_s == pytest.approx(0.35)
    # Seven gaps of 0.4 s / 7 = 57 ms: all in the (0.05, 0.075] bucket.
    assert outcome.inter_token_counts[ITL_BUCKETS.index(0.075)] == 7 == sum(outcome.inter_token_counts)
    assert outcome.inter_token_sum_s == pytest.approx(0.4)


async def test_two_prompts_of_one_request_add_up() -> None:
    tally = GenerationTally()
    await drain(count(source([output([3])]), tally, delta=False))
    await drain(count(source([output([2], prompt=4)]), tally, delta=False))
    assert (tally.prompt_tokens, tally.completion_tokens) == (11, 5)


async def test_stopping_early_closes_the_engine_stream() -> None:
    closed = []

    async def engine() -> AsyncIterator[Any]:
        try:
            for _ in range(10):
                yield output([1])
        finally:
            closed.append(True)

    tally = GenerationTally()
    counted = count(engine(), tally, delta=True)
    await anext(counted)
    await counted.aclose()
    assert closed == [True] and tally.completion_tokens == 1


async def test_a_request_generates_from_its_first_read_until_its_end_or_close() -> None:
    """The engine core's placement counts a request as generating while its
    outputs are read: from the first read on, until they end or are closed
    early (a client gone); outputs never read count for nothing."""
    placement = Recorded()
    placer = CorePlacer(placement, "auto")
    unread = count(source([output([1])]), GenerationTally(), True, placer)
    ended = count(source([output([1]), output([1])]), GenerationTally(), True, placer)
    closed = count(source([output([1]), output([1])]), GenerationTally(), True, placer)
    await anext(ended)
    await anext(closed)
    assert placer.generating == 2
    await drain(ended)
    assert placer.generating == 1
    await closed.aclose()
    assert placer.generating == 0
    await unread.aclose()
    assert placer.generating == 0
    assert placement.moves == (["beside", "left"] if BESIDE_WORKERS_AT <= 2 else [])


async def test_tokens_are_counted_as_they_pass_not_when_the_stream_is_closed() -> None:
    """A reader that stops at a ``yield`` (the replica found the client gone)
    leaves the generator to be closed later, when collected; what it let
    through is counted already, for the outcome reported at once."""

    async def engine() -> AsyncIterator[Any]:
        for _ in range(10):
            yield output([2])

    tally = GenerationTally()
    counted = count(engine(), tally, delta=True)
    await anext(counted)
    await anext(counted)
    assert (tally.prompt_tokens, tally.completion_tokens) == (7, 4)
    await counted.aclose()
    assert tally.completion_tokens == 4
