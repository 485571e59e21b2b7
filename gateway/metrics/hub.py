"""Where the gateway's processes send their metrics, so one scrape sees them all.

With several ingress replicas, ``MetricsHub`` is a one-replica Serve
deployment in the ingress's application. Each ingress replica sends the
cumulative snapshot of its families (``MetricsReporter``) at most every
``REPORT_S`` while it records, and at least every ``HEARTBEAT_S``. A scrape
of ``/metrics`` lands on one ingress replica, which sends its own snapshot
with the request, so its counts are current to the request and the others'
to their last report. vLLM's own ``vllm:*`` pages are asked of the LLM
replicas for each scrape (``gateway.metrics.engine_pages``); they call the
ingress, which passes their calls on. A lone ingress replica keeps a
``MetricsHub`` object of its own instead, and the keys' ledger in its own
process: no hub replica, one Ray worker fewer awake beside the engines.

A process silent for ``STALE_S`` has gone: its counters and histograms stay
(counters must never go back), its gauges leave the sum, and its vLLM
series leave the page. One silent for ``RETIRED_S`` (long past Serve's
health checks, which replace a replica that stops answering) is folded into
one sum with the others retired, so that replicas replaced for weeks cost
a scrape no more than one does. (One that reports again after that, cut off
from the hub for an hour while it served, is counted twice from then.)

Being the gateway's one shared replica, a deployed hub also holds the API keys'
ledger (``gateway.auth.limiter``): it serves it on a port of its own, which
it publishes as replica metadata when Serve asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.auth.limiter_wire import LimiterAddress
from gateway.auth.limiter_server import LimiterServer
from gateway.metrics.engine_pages import EnginePages
from gateway.metrics.engine_text import relabel
from gateway.metrics.families import FAMILIES
from gateway.metrics.registry import Snapshot, merge, render, without_gauges
from gateway.replica_logs import to_stderr

logger = logging.getLogger(__name__)

REPORT_S = 0.5
HEARTBEAT_S = 2.0
STALE_S = 10.0
RETIRED_S = 3600.0
LAST_REPORT_S = 2.0  # the most a stopping replica waits to send its last counts
HUB_NAME = "MetricsHub"
_NOTHING = object()  # no collection made yet
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def replica_source() -> str:
    """The calling Serve replica's id, as it reports to the hub."""
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)


class MetricsHub:
    """A Serve deployment class (made a deployment in ``gateway.app``)."""

    def __init__(self) -> None:
        to_stderr()
        self._live: dict[str, tuple[Snapshot, float]] = {}
        self._gone: dict[str, tuple[Snapshot, float]] = {}  # silent, and since when
        self._retired: Snapshot = {}  # the sum of those silent for RETIRED_S
        self._versions: dict[str, int] = {}  # each source's latest snapshot taken in
        self._engines = EnginePages(STALE_S)
        self._limiter: LimiterServer | None = None
        self._limiter_address: LimiterAddress | None = None

    async def record_replica_metadata(self) -> dict[str, Any]:
        """Serve asks once the replica is up: the ledger's address for the ingress."""
        if self._limiter_address is None:
            import ray

            self._limiter = LimiterServer(str(ray.util.get_node_ip_address()))
            self._limiter_address = await self._limiter.start()
        return self._limiter_address.metadata()

    # The calls ingress and LLM replicas make are coroutines: Serve runs a
    # plain method on a thread pool, where it would change what a scrape on
    # the loop is reading (and set the loop's events from another thread).

    async def report(self, source: str, snapshot: Snapshot, version: int | None = None) -> None:
        self._report(source, snapshot, version)

    def _report(self, source: str, snapshot: Snapshot, version: int | None = None) -> None:
        """Keeps ``source``'s ``snapshot``, unless one of a later ``version``
        came first: a replica's report and a scrape's snapshot are separate
        calls whose order Serve does not keep, and an older one taken in
        would show its counters going back (a reset, to Prometheus)."""
        if version is not None:
            if version < self._versions.get(source, version):
                return
            self._versions[source] = version
        self._live[source] = (snapshot, time.monotonic())
        self._gone.pop(source, None)

    async def engine_asked(self, source: str, answered: int) -> int:
        """Held for an LLM replica until a scrape wants its page (``EnginePages.asked``)."""
        return await self._engines.asked(source, answered)

    async def report_engine(self, source: str, text: str, answers: int) -> None:
        """``text``: one LLM replica's ``vllm:*`` families, Prometheus text format,
        rendered for scrape ``answers``."""
        self._engines.put(source, text, answers)

    async def engine_gone(self, source: str) -> None:
        self._engines.forget(source)

    async def render(self, source: str, snapshot: Snapshot, version: int | None = None) -> str:
        """The page for a scrape that arrived at ``source`` (whose snapshot is current)."""
        self._report(source, snapshot, version)
        self._expire()
        merged = merge([*(s for s, _ in self._live.values()), *(s for s, _ in self._gone.values()), self._retired])
        page = render(FAMILIES, merged)
        return page + relabel(await self._engines.fresh())

    def _expire(self) -> None:
        now = time.monotonic()
        for source, (snapshot, seen) in list(self._live.items()):
            if now - seen > STALE_S:
                del self._live[source]
                self._gone[source] = (without_gauges(snapshot, FAMILIES), seen)
        for source, (snapshot, seen) in list(self._gone.items()):
            if now - seen > RETIRED_S:
                del self._gone[source]
                self._versions.pop(source, None)
                self._retired = merge([self._retired, snapshot])


class MetricsReporter:
    """Sends what ``collect`` returns to the hub through ``send``, while the replica lives.

    ``changed`` returns a value that differs whenever there is news; unchanged
    collections are sent only as heartbeats. ``after_each`` runs every cycle
    (the ingress flushes its access log there), also with no ``send`` (no
    hub: nothing is collected).
    """

    def __init__(
        self,
        send: Callable[[Any], Any] | None,
        collect: Callable[[], Any],
        changed: Callable[[], object],
        after_each: Callable[[], None] | None = None,
        interval_s: float = REPORT_S,
    ) -> None:
        self._send = send
        self._collect = collect
        self._changed = changed
        self._after_each = after_each
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._last: object = _NOTHING  # the version last sent

    def start(self) -> None:
        """Starts the loop on the running event loop (once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stops the loop, then sends the last counts if they changed since
        the last report: what the replica served since (its last requests,
        drained on the way out) would otherwise never reach the hub."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            if self._send is not None and self._changed() != self._last:
                try:
                    await asyncio.wait_for(self._send(self._collect()), LAST_REPORT_S)
                except Exception as exc:  # noqa: BLE001 - the hub may be gone too
                    logger.debug("last metrics report failed: %s", exc)

    async def _run(self) -> None:
        sent_at = 0.0
        collected: Any = None
        collected_at: object = _NOTHING
        while True:
            await asyncio.sleep(self._interval_s)
            if self._after_each is not None:
                self._after_each()
            if self._send is None:
                continue
            version = self._changed()
            now = time.monotonic()
            if version == self._last and now - sent_at < HEARTBEAT_S:
                continue
            # A heartbeat sends what was collected for this version again:
            # collecting (vLLM renders its whole registry) is the costly part.
            if version != collected_at:
                collected, collected_at = self._collect(), version
            try:
                await self._send(collected)
            except Exception as exc:  # noqa: BLE001 - the hub may be starting or moving
                logger.debug("metrics report failed: %s", exc)
                continue
            self._last, sent_at = version, now
