"""vLLM's own metrics pages (``vllm:*``), rendered only when ``/metrics`` is scraped.

vLLM renders its whole Prometheus registry (about 400 samples for one model,
7-10 ms of Python on a 2-vCPU host) on the replica's event loop, the loop that
also writes every token of every stream the replica serves: rendered each
second, that is a 7-10 ms gap in every stream each second. ``vllm serve``
renders it only when ``/metrics`` is asked for, and so does the gateway:

- each LLM replica holds one call open at the hub, through the ingress
  (``EnginePages.asked``);
- a scrape answers those calls; each replica renders its page once and
  sends it (``EnginePages.put``);
- the scrape waits for the pages of the replicas it asked, at most
  ``FRESH_WAIT_S``, and uses the last page of any that did not answer in
  time.

A held call returns unanswered after ``HOLD_S``, and the replica calls
again: that is how the hub knows which replicas are alive. A replica silent
for the hub's ``stale_s`` has gone, and its page leaves the scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

HOLD_S = 2.0
FRESH_WAIT_S = 2.0
RETRY_S = 1.0  # after a call to the hub failed


class EnginePages:
    """The LLM replicas' pages, kept by the metrics hub."""

    def __init__(self, stale_s: float) -> None:
        self._stale_s = stale_s
        self._asked = 0  # scrapes that asked so far
        self._ask = asyncio.Event()  # set (and replaced) when a scrape asks
        self._came = asyncio.Event()  # set (and replaced) when a page comes
        self._pages: dict[str, tuple[str, int]] = {}  # source: (page, the scrape it answers)
        self._seen: dict[str, float] = {}  # source: when it last called

    async def asked(self, source: str, answered: int) -> int:
        """Held until a scrape asks after the one ``answered`` (returns its
        number), at most ``HOLD_S`` (returns ``answered``). A number other
        than ``answered`` returns at once: the hub may have restarted."""
        self._seen[source] = time.monotonic()
        if self._asked == answered:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ask.wait(), HOLD_S)
        self._seen[source] = time.monotonic()
        return self._asked

    def put(self, source: str, page: str, answers: int) -> None:
        """``page``: ``source``'s Prometheus text, rendered for scrape ``answers``."""
        self._pages[source] = (page, answers)
        self._seen[source] = time.monotonic()
        came, self._came = self._came, asyncio.Event()
        came.set()

    def forget(self, source: str) -> None:
        """``source`` stops: no scrape waits for it, and its page leaves."""
        self._seen.pop(source, None)
        self._pages.pop(source, None)

    async def fresh(self) -> dict[str, str]:
        """Every live replica's page, asked for now."""
        self._expire()
        if not self._seen:
            return {}
        self._asked += 1
        asked = self._asked
        ask, self._ask = self._ask, asyncio.Event()
        ask.set()
        deadline = time.monotonic() + FRESH_WAIT_S
        while (left := deadline - time.monotonic()) > 0 and self._waiting_for(asked):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._came.wait(), left)
        return {source: page for source, (page, _) in self._pages.items()}

    def _waiting_for(self, asked: int) -> bool:
        return any(self._pages.get(source, ("", -1))[1] < asked for source in self._seen)

    def _expire(self) -> None:
        now = time.monotonic()
        for source, seen in list(self._seen.items()):
            if now - seen > self._stale_s:
                self.forget(source)


async def answer_scrapes(hub: Any, source: str, render: Callable[[], str]) -> None:
    """Runs in an LLM replica while it lives: each time a scrape asks
    (``hub``: a handle to the ingress, which keeps the pages or passes the
    calls to the metrics hub), renders the page and sends it."""
    answered = 0
    while True:
        try:
            asked = await hub.engine_asked.remote(source, answered)
            if asked != answered:
                await hub.report_engine.remote(source, render(), asked)
                answered = asked
        except Exception as exc:  # noqa: BLE001 - the hub may be starting or moving
            logger.debug("engine metrics not sent: %s", exc)
            await asyncio.sleep(RETRY_S)
