"""gateway/leaving.py: work waited on for a caller that may leave first."""

from __future__ import annotations

import asyncio

import pytest

from gateway.leaving import CallerLeft, unless_caller_leaves


class Work:
    """Work that ends when told to, and says whether it was cancelled."""

    def __init__(self, result: object = "done") -> None:
        self.result, self.go, self.cancelled = result, asyncio.Event(), False

    async def run(self) -> object:
        try:
            await self.go.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


async def test_the_works_result_or_error_when_the_caller_stays() -> None:
    for result in ("done", ValueError("failed")):
        work, staying = Work(result), asyncio.Event()
        work.go.set()
        waiting = asyncio.ensure_future(unless_caller_leaves(work.run(), staying.wait()))
        if isinstance(result, BaseException):
            with pytest.raises(ValueError, match="failed"):
                await waiting
        else:
            assert await waiting == "done"
        assert not work.cancelled


async def test_a_caller_that_leaves_first_cancels_the_work() -> None:
    work, leaves = Work(), asyncio.Event()
    waiting = asyncio.ensure_future(unless_caller_leaves(work.run(), leaves.wait()))
    await asyncio.sleep(0)
    leaves.set()
    with pytest.raises(CallerLeft):
        await waiting
    assert work.cancelled


async def test_cancelled_itself_it_cancels_the_work_and_stops_watching() -> None:
    """A timeout around it: the work is cancelled, and so is the watch (which
    may hold a reader the caller's next request needs)."""
    work, watched = Work(), asyncio.Event()
    watch_ended = asyncio.Event()

    async def watch() -> None:
        try:
            await watched.wait()
        finally:
            watch_ended.set()

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await unless_caller_leaves(work.run(), watch())
    assert work.cancelled and watch_ended.is_set()


async def test_a_result_it_cannot_return_is_discarded() -> None:
    """Cancelled (a timeout) in the turn the work finished: what the work
    made (an open stream) is handed to ``discard`` rather than lost open."""
    work, discarded = Work("stream"), []
    waiting = asyncio.ensure_future(unless_caller_leaves(work.run(), asyncio.Event().wait(), discarded.append))
    await asyncio.sleep(0)  # (one turn: it waits on the work)
    work.go.set()
    waiting.cancel()  # before it has run again: the work is done, its result not returned
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0)  # (the work's done callbacks run)
    assert discarded == ["stream"] and not work.cancelled


async def test_a_returned_result_is_not_discarded() -> None:
    work, discarded = Work("stream"), []
    work.go.set()
    assert await unless_caller_leaves(work.run(), asyncio.Event().wait(), discarded.append) == "stream"
    await asyncio.sleep(0)
    assert discarded == []
