"""How often an event loop ran other coroutines while a test's work ran on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Ticks:
    count = 0


@asynccontextmanager
async def ticking() -> AsyncIterator[Ticks]:
    """Counts the loop's turns to another coroutine inside the block (a
    coroutine that yields and counts, again and again): none where the block
    held the loop throughout."""
    ticks = Ticks()

    async def tick() -> None:
        while True:
            await asyncio.sleep(0)
            ticks.count += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    ticks.count = 0
    try:
        yield ticks
    finally:
        ticker.cancel()
