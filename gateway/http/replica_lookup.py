"""Bounded waits for a model to have a running replica: requests find out in
at most a few seconds, and while the model stays down later ones at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.errors import ServiceUnavailableError
from gateway.http.background import in_background

logger = logging.getLogger(__name__)

_NOT_RUNNING = "No replica of the model is running (it is starting or restarting); please retry shortly."


def _retrieved(task: asyncio.Future[None]) -> None:
    """Marks a shared look-up's exception as seen when no request is left to await it."""
    if not task.cancelled():
        task.exception()


class BoundedLookUp:
    """A look-up for a running replica of one model, shared by the requests
    that need it, each waiting at most ``wait_s`` from when it began.

    Serve's router waits for a running replica however long it takes. Past
    ``wait_s`` a request is answered 503 ``service_unavailable`` with
    ``Retry-After``; the look-up goes on in the background, so while the
    model stays down (restarting, not yet up) later requests are answered
    at once, and the first after it is back starts a fresh one.
    """

    def __init__(
        self,
        look: Callable[[], Awaitable[None]],
        wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        message: str = _NOT_RUNNING,
    ) -> None:
        self._look = look
        self.wait_s = wait_s
        self._clock = clock
        self._message = message
        self._since = 0.0
        self._task: asyncio.Future[None] | None = None

    async def wait(self, within: float | None = None) -> None:
        """Returns once the look-up has ended (raising what it raised), or
        raises ServiceUnavailableError (503) when it takes too long (or
        longer than ``within`` seconds from now)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._look())
            self._task.add_done_callback(_retrieved)
            self._since = self._clock()
        left = self.wait_s - (self._clock() - self._since)
        if within is not None:
            left = min(left, within)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), max(left, 0.0))
        except TimeoutError:
            raise ServiceUnavailableError(self._message) from None

    async def ended(self, timeout: float) -> None:
        """Waits ``timeout`` seconds, or less when the look-up under way ends sooner."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)
        else:
            await asyncio.sleep(timeout)


class RunningReplica:
    """Bounds the wait for a running replica of a model called through
    Serve's handle (classical models): before a call, unless a replica was
    seen running within ``FRESH_S`` (or a call was just answered), one is
    looked for with Serve's router, without reserving it; see BoundedLookUp.
    A call already with Serve's router (which also waits, and moves a call
    whose replica died to the next one it starts) is checked each ``wait_s``
    it goes unanswered: with no replica running it is given up (``stalled``)."""

    FRESH_S = 2.0
    CHECK_S = 0.5  # how long a running replica may take to be named in a check

    def __init__(self, handle: Any, wait_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._handle = handle
        self._clock = clock
        self._seen_at = -self.FRESH_S
        self._look_up = BoundedLookUp(self._look, wait_s, clock)
        # A model that scales to zero: each look-up also sends it one call (``wake``), which Serve
        # queues and counts, where a look-up alone is not counted: at zero replicas nothing asked
        # for one, and every request was answered 503 for ever.
        self.wake: Callable[[], Any] | None = None

    @property
    def wait_s(self) -> float:
        return self._look_up.wait_s

    def fresh(self) -> bool:
        """Whether a call may go now without a look-up (the hot path's check)."""
        return self._clock() - self._seen_at < self.FRESH_S

    async def ready(self) -> None:
        """Returns when the model has a running replica; raises
        ServiceUnavailableError (503) after at most ``wait_s``."""
        if not self.fresh():
            await self._look_up.wait()

    def stalled(self) -> asyncio.Future[None]:
        """For one call: a future that fails with ServiceUnavailableError
        (503) once the call has gone ``wait_s`` unanswered while the model has
        no running replica; it never ends otherwise. Cancel it when the call
        ends (costing nothing more than a timer until then)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._arm(loop, future)
        return future

    def _arm(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        timer = loop.call_later(self.wait_s, self._check, loop, future)
        future.add_done_callback(lambda _: timer.cancel())

    def _check(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        async def check() -> None:
            try:
                await self._look_up.wait(within=self.CHECK_S)
            except ServiceUnavailableError as error:
                self.lost()
                if not future.done():
                    future.set_exception(error)
                return
            except Exception as exc:  # noqa: BLE001 - the router failed to answer: keep waiting
                logger.info("could not check a model's replicas: %s", exc)
            if not future.done():
                self._arm(loop, future)  # a replica is running: the call is only slow

        if not future.done():
            in_background(check())

    def seen(self) -> None:
        """A call was answered: a replica is running."""
        self._seen_at = self._clock()

    def lost(self) -> None:
        """A call found its replica gone: look before the next one."""
        self._seen_at = -self.FRESH_S

    async def _look(self) -> None:
        waking = self.wake() if self.wake is not None else None
        try:
            async with self._handle.choose_replica(_reserve=False):
                pass
        except BaseException:
            if waking is not None:
                with contextlib.suppress(Exception):  # (Serve's cancel raises what the call failed with)
                    waking.cancel()  # no longer needed; one that reached a replica runs to its (cheap) end
            raise
        self._seen_at = self._clock()
