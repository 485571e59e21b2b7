"""Groups stream frames so that fewer, larger messages cross Ray.

Every message between replicas costs CPU on both ends, and a token stream has
hundreds of them. The first frame goes out the moment it exists; later frames
that arrive within ``interval_s`` of the last send travel together.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator


async def coalesce(frames: AsyncIterator[bytes], interval_s: float) -> AsyncIterator[bytes]:
    """Yields ``frames`` joined into batches; the first frame alone and at once.

    Closing this generator early stops the reading of ``frames`` and closes
    it, which aborts the engine request behind it.
    """
    batches = _batches(frames, interval_s)
    try:
        async for batch in batches:
            yield batch
    finally:
        # Inner first: it cancels the task that may be iterating ``frames``.
        await batches.aclose()
        if isinstance(frames, AsyncGenerator):
            await frames.aclose()


async def _batches(frames: AsyncIterator[bytes], interval_s: float) -> AsyncGenerator[bytes, None]:
    iterator = aiter(frames)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        return
    yield first
    if interval_s <= 0:
        async for frame in iterator:
            yield frame
        return

    buffer: list[bytes] = []
    arrived = asyncio.Event()

    async def read() -> None:
        try:
            async for frame in iterator:
                buffer.append(frame)
                arrived.set()
        finally:
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            await arrived.wait()
            if not reader.done():
                # Hold briefly so frames produced meanwhile share one message;
                # the end of the stream releases the hold at once.
                await asyncio.wait({reader}, timeout=interval_s)
            arrived.clear()
            if buffer:
                batch = b"".join(buffer)
                buffer.clear()
                yield batch
            if reader.done() and not buffer:
                break
        reader.result()  # re-raise an error of the engine stream
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
