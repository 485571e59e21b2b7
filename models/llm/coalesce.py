"""Groups stream frames so that fewer, larger messages cross Ray.

Every message between replicas costs CPU on both ends, and a token stream has
hundreds of them. The first batch (everything the engine's first step
produced) goes out the moment it exists; later frames wait up to ``hold()``
seconds, asked afresh for each batch, for others to travel with.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable


async def coalesce(
    frames: AsyncIterator[bytes], hold: Callable[[], float]
) -> AsyncIterator[bytes]:
    """Yields ``frames`` joined into batches; the first batch at once.

    Closing this generator early stops the reading of ``frames`` and closes
    it, which aborts the engine request behind it.
    """
    marked = coalesce_marked(frames, hold)
    try:
        async for batch, _ in marked:
            yield batch
    finally:
        await marked.aclose()


async def coalesce_marked(
    frames: AsyncIterator[bytes], hold: Callable[[], float]
) -> AsyncGenerator[tuple[bytes, bool], None]:
    """As ``coalesce``, yielding ``(batch, last)``: ``last`` is true when ``frames``
    had ended as the batch was taken. (A stream that ends just after a batch
    leaves the last batch unmarked: its end shows only as the generator's end.)
    """
    batches = _batches(frames, hold)
    try:
        async for marked in batches:
            yield marked
    finally:
        # Inner first: it cancels the task that may be iterating ``frames``.
        await batches.aclose()
        if isinstance(frames, AsyncGenerator):
            await frames.aclose()


async def _batches(
    frames: AsyncIterator[bytes], hold: Callable[[], float]
) -> AsyncGenerator[tuple[bytes, bool], None]:
    buffer: list[bytes] = []
    arrived = asyncio.Event()

    async def read() -> None:
        try:
            async for frame in frames:
                buffer.append(frame)
                arrived.set()
        finally:
            arrived.set()

    # The reader runs until the engine stream blocks before this loop wakes up,
    # so the first flush carries every frame the first step produced (vLLM
    # sends a role-only chunk and the first token back to back).
    reader = asyncio.create_task(read())
    first = True
    try:
        while True:
            await arrived.wait()
            wait_s = 0.0 if first else hold()
            if wait_s > 0 and not reader.done():
                # Hold briefly so frames produced meanwhile share one message;
                # the end of the stream releases the hold at once.
                await asyncio.wait({reader}, timeout=wait_s)
            first = False
            arrived.clear()
            if buffer:
                batch = b"".join(buffer)
                buffer.clear()
                yield batch, reader.done()
            if reader.done() and not buffer:
                break
        reader.result()  # re-raise an error of the engine stream
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
