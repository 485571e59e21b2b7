"""gateway/metrics/engine_pages.py: an LLM replica renders vLLM's page only when a scrape asks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.metrics import engine_pages
from gateway.metrics.engine_pages import EnginePages, answer_scrapes
from gateway.metrics.hub import MetricsHub
from gateway.metrics.recorder import GatewayMetrics


class _Method:
    """A deployment handle's method, called in this loop."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call

    def remote(self, *args: Any) -> Awaitable[Any]:
        async def call() -> Any:
            result = self._call(*args)
            return await result if asyncio.iscoroutine(result) else result

        return call()


class _Handle:
    def __init__(self, hub: MetricsHub) -> None:
        self.engine_asked = _Method(hub.engine_asked)
        self.report_engine = _Method(hub.report_engine)


class _Replica:
    """What an LLM replica runs: counts its renders."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.renders = 0

    def render(self) -> str:
        self.renders += 1
        return f"# TYPE vllm:renders counter\nvllm:renders_total {self.renders}\n"


@contextlib.asynccontextmanager
async def answering(hub: MetricsHub, *replicas: _Replica) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(answer_scrapes(_Handle(hub), r.name, r.render)) for r in replicas]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_pages, "HOLD_S", 0.05)
    monkeypatch.setattr(engine_pages, "FRESH_WAIT_S", 0.3)


async def test_replicas_render_only_for_a_scrape_and_the_scrape_gets_fresh_pages() -> None:
    hub, one, two = MetricsHub(), _Replica("one"), _Replica("two")
    async with answering(hub, one, two):
        await asyncio.sleep(0.3)  # several held calls come back unanswered
        assert (one.renders, two.renders) == (0, 0)
        page = await hub.render("ingress", GatewayMetrics().snapshot())
        assert (one.renders, two.renders) == (1, 1)
        assert 'vllm:renders_total{replica="one"} 1' in page and 'vllm:renders_total{replica="two"} 1' in page
        page = await hub.render("ingress", GatewayMetrics().snapshot())
        assert 'vllm:renders_total{replica="one"} 2' in page  # each scrape asks again
        await asyncio.sleep(0.2)
        assert (one.renders, two.renders) == (2, 2)


async def test_a_scrape_waits_only_so_long_for_a_replica_that_does_not_answer() -> None:
    pages = EnginePages(stale_s=10)
    pages.put("slow", "old page", 0)  # it answered once, and now does not
    started = time.monotonic()
    assert await pages.fresh() == {"slow": "old page"}
    assert engine_pages.FRESH_WAIT_S <= time.monotonic() - started < 2


async def test_a_stopped_or_silent_replica_leaves_and_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_pages, "FRESH_WAIT_S", 5.0)  # a wait, were there one, stands out of any host's pause
    pages = EnginePages(stale_s=0.1)
    pages.put("stopped", "page", 0)
    pages.put("silent", "page", 0)
    pages.forget("stopped")
    await asyncio.sleep(0.15)
    started = time.monotonic()
    assert await pages.fresh() == {}
    assert time.monotonic() - started < 1


async def test_a_replica_that_answered_a_later_scrape_than_the_hub_knows_is_asked_at_once() -> None:
    # The hub restarted: its scrapes count from 0 again.
    pages = EnginePages(stale_s=10)
    assert await asyncio.wait_for(pages.asked("replica", answered=7), 0.02) == 0


async def test_the_replica_keeps_calling_after_the_hub_failed() -> None:
    hub, replica, calls = MetricsHub(), _Replica("r"), [0]
    handle = _Handle(hub)
    asked = handle.engine_asked

    class _Flaky:
        def remote(self, *args: Any) -> Awaitable[Any]:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("hub not up yet")
            return asked.remote(*args)

    handle.engine_asked = _Flaky()  # type: ignore[assignment]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_pages, "RETRY_S", 0.01)
        task = asyncio.create_task(answer_scrapes(handle, replica.name, replica.render))
        await asyncio.sleep(0.05)
        page = await hub.render("ingress", GatewayMetrics().snapshot())
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert calls[0] >= 2 and 'vllm:renders_total{replica="r"} 1' in page
