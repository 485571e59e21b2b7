"""models/llm/coalesce.py: first frame at once, later frames batched, nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from models.llm.coalesce import coalesce

INTERVAL = 0.1


@dataclass
class Source:
    """Yields ``frames``, sleeping ``delays[i]`` before frame i; records its fate."""

    frames: list[bytes]
    delays: list[float]
    fail_after: int | None = None
    sent: list[bytes] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False

    async def run(self) -> AsyncIterator[bytes]:
        try:
            for i, (frame, delay) in enumerate(zip(self.frames, self.delays, strict=True)):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("engine died")
                await asyncio.sleep(delay)
                self.sent.append(frame)
                yield frame
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.finished = True


async def _collect(batches: AsyncIterator[bytes]) -> list[tuple[float, bytes]]:
    loop = asyncio.get_running_loop()
    return [(loop.time(), batch) async for batch in batches]


async def test_first_frame_comes_alone_and_at_once() -> None:
    # The second frame is ready almost at once: it must still not ride with the first.
    source = Source([b"a", b"b", b"c"], [0, 0.001, 0.001])
    loop = asyncio.get_running_loop()
    started = loop.time()

    batches = coalesce(source.run(), lambda: INTERVAL)
    first = await anext(batches)
    elapsed = loop.time() - started
    rest = [batch async for batch in batches]

    assert first == b"a"
    assert elapsed < INTERVAL / 2
    assert rest == [b"bc"]


async def test_frames_within_the_interval_are_joined() -> None:
    # a at 0; b, c, d within the window opened by b; e long after it.
    source = Source([b"a", b"b", b"c", b"d", b"e"], [0, 0.01, 0.01, 0.01, 3 * INTERVAL])

    timed = await _collect(coalesce(source.run(), lambda: INTERVAL))

    assert [batch for _, batch in timed] == [b"a", b"bcd", b"e"]


@pytest.mark.parametrize(
    "delays",
    [
        [0.0] * 20,
        [0.003] * 20,
        [0.0, 0.05, 0.0, 0.12, 0.01, 0.0, 0.2, 0.0, 0.03, 0.0, 0.0, 0.15, 0.0, 0.0, 0.0, 0.01, 0.0, 0.0, 0.0, 0.0],
    ],
    ids=["burst", "steady", "irregular"],
)
async def test_batches_concatenate_to_the_source(delays: list[float]) -> None:
    frames = [f"data: {i}\n\n".encode() for i in range(len(delays))]
    source = Source(frames, delays)

    batches = [batch async for batch in coalesce(source.run(), lambda: INTERVAL)]

    assert b"".join(batches) == b"".join(frames)
    assert batches[0] == frames[0]
    assert all(batches)
    assert source.finished and not source.cancelled


@pytest.mark.parametrize("interval", [0, -1])
async def test_no_interval_passes_frames_one_by_one(interval: float) -> None:
    frames = [b"a", b"b", b"c", b"d"]
    source = Source(frames, [0, 0, 0, 0])

    assert [batch async for batch in coalesce(source.run(), lambda: interval)] == frames


async def test_empty_source_yields_nothing() -> None:
    source = Source([], [])

    assert [batch async for batch in coalesce(source.run(), lambda: INTERVAL)] == []


@pytest.mark.parametrize("interval", [INTERVAL, 0])
async def test_source_error_after_first_frame_reaches_consumer(interval: float) -> None:
    source = Source([b"a", b"b", b"c", b"d"], [0, 0.01, 0.01, 0.01], fail_after=3)
    received: list[bytes] = []

    with pytest.raises(RuntimeError, match="engine died"):
        async for batch in coalesce(source.run(), lambda: interval):
            received.append(batch)

    assert received[0] == b"a"
    # Frames produced before the failure are delivered before the error.
    assert b"".join(received) == b"abc"


async def test_source_error_before_first_frame_reaches_consumer() -> None:
    source = Source([b"a"], [0], fail_after=0)

    with pytest.raises(RuntimeError, match="engine died"):
        await anext(coalesce(source.run(), lambda: INTERVAL))


async def test_closing_consumer_mid_stream_cancels_source() -> None:
    source = Source([b"a", b"b", b"c", b"d"], [0, 0.01, 10, 10])
    batches = coalesce(source.run(), lambda: INTERVAL)

    assert await anext(batches) == b"a"
    assert await anext(batches) == b"b"
    await batches.aclose()  # type: ignore[attr-defined]

    assert source.cancelled
    assert source.finished
    assert source.sent == [b"a", b"b"]


@pytest.mark.parametrize(
    ("interval", "taken"),
    [(INTERVAL, 1), (0, 1), (0, 2)],
    ids=["batched-after-first", "unbatched-after-first", "unbatched-mid-stream"],
)
async def test_closing_consumer_outside_batching_closes_source(interval: float, taken: int) -> None:
    # The docstring promises that closing the consumer closes ``frames`` (which
    # aborts the engine request), also before batching begins and when the
    # interval is 0. The caller (LLMServer) holds ``frames`` too, so garbage
    # collection cannot be what closes it.
    source = Source([b"a", b"b", b"c"], [0, 0, 10])
    frames = source.run()
    batches = coalesce(frames, lambda: interval)

    for _ in range(taken):
        await anext(batches)
    await batches.aclose()  # type: ignore[attr-defined]

    assert source.finished


async def test_frames_ready_together_with_the_first_leave_with_it() -> None:
    # vLLM yields a role-only chunk and the first token back to back: holding the
    # token for the next batch would add the whole hold to time-to-first-token.
    async def burst() -> AsyncIterator[bytes]:
        yield b"role"
        yield b"token1"
        await asyncio.sleep(0.05)
        yield b"token2"

    batches = coalesce(burst(), lambda: INTERVAL)
    assert await anext(batches) == b"roletoken1"
    assert [b async for b in batches] == [b"token2"]


async def test_hold_is_asked_afresh_for_each_batch() -> None:
    holds = iter([0.0, INTERVAL, 0.0, 0.0])
    asked: list[float] = []

    def hold() -> float:
        asked.append(next(holds))
        return asked[-1]

    source = Source([b"a", b"b", b"c", b"d"], [0, 0.01, 0.01, 0.2])
    batches = [batch async for batch in coalesce(source.run(), hold)]
    assert b"".join(batches) == b"abcd"
    assert len(asked) >= 2  # once per batch after the first
