"""Waiting on work for a caller that may leave first: the ingress for its
client (ASGI ``http.disconnect``), a model replica for the ingress (the relay
connection closed). Either way the work is cancelled, which aborts an engine
request it waits on, instead of running on for no one."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class CallerLeft(Exception):
    """The caller left before the work was done."""


async def unless_caller_leaves(
    work: Awaitable[T], left: Awaitable[Any], discard: Callable[[T], object] | None = None
) -> T:
    """``work``'s result, or its error; CallerLeft, with ``work`` cancelled,
    when ``left`` (the caller's going) completes first. ``left`` is stopped,
    and has ended, on return (a reader it read from is free again).

    A result that is not returned (this call was cancelled, a timeout, in the
    turn ``work`` finished, or while it could no longer be stopped) goes to
    ``discard``, which releases what it holds."""
    task = asyncio.ensure_future(work)
    leaving = asyncio.ensure_future(left)
    returned = False
    try:
        try:
            await asyncio.wait({task, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
            await asyncio.wait({leaving})
            if not task.done():  # the caller left, or this call was cancelled (a timeout)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise CallerLeft
        result = task.result()
        returned = True
        return result
    finally:
        if not returned and discard is not None:
            task.add_done_callback(functools.partial(_discarded, discard))


def _discarded(discard: Callable[[Any], object], task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        discard(task.result())
