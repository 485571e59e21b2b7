"""gateway/metrics/hub.py: the hub sums reporters; reporters send news and heartbeats."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import hub as hub_module
from gateway.metrics.hub import MetricsHub, MetricsReporter
from gateway.metrics.recorder import GatewayMetrics, RequestRecord


def served(metrics: GatewayMetrics, status: int, in_flight: int = 0) -> None:
    for _ in range(in_flight):
        metrics.request_started("/v1/chat/completions")
    metrics.request_started("/v1/chat/completions")
    metrics.request_finished(RequestRecord("id", "/v1/chat/completions", 0.0, "m", "m"), status, 0.01)


def values(page: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {
        frozenset(s.labels.items()): s.value
        for f in text_string_to_metric_families(page)
        for s in f.samples
        if s.name == name
    }


async def test_the_page_sums_every_replica_and_the_scraped_one_is_current() -> None:
    hub, one, two = MetricsHub(), GatewayMetrics(), GatewayMetrics()
    served(one, 200, in_flight=1)
    served(two, 200)
    await hub.report("two", two.snapshot())
    served(two, 500)  # not reported yet: the next report will carry it
    page = await hub.render("one", one.snapshot())
    requests = values(page, "llm_gateway_requests_total")
    labels = {("route", "/v1/chat/completions"), ("model", "m"), ("variant", "m"), ("key", "")}
    assert requests == {frozenset({*labels, ("status", "200")}): 2}
    assert values(page, "llm_gateway_in_flight_requests") == {frozenset({("route", "/v1/chat/completions")}): 1}


async def test_a_replicas_older_snapshot_arriving_late_is_not_taken_in() -> None:
    # A report and a scrape's snapshot are separate calls Serve may reorder:
    # the older one taken in last showed the counters going back (a reset).
    hub, one, two = MetricsHub(), GatewayMetrics(), GatewayMetrics()
    served(one, 200)
    early = (one.version, one.snapshot())
    served(one, 200)
    page = await hub.render("one", one.snapshot(), one.version)
    await hub.report("one", early[1], early[0])  # the reporter's, sent before and arriving after
    later = await hub.render("two", two.snapshot(), two.version)
    counted = {k: v for k, v in values(later, "llm_gateway_requests_total").items() if ("status", "200") in k}
    assert list(counted.values()) == [2] == list(values(page, "llm_gateway_requests_total").values())
    served(one, 200)
    await hub.report("one", one.snapshot(), one.version)  # a newer one is
    page = await hub.render("two", two.snapshot(), two.version)
    assert list(values(page, "llm_gateway_requests_total").values()) == [3]


async def test_a_silent_replica_keeps_its_counts_and_drops_its_gauges(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(hub_module.time, "monotonic", lambda: clock[0])
    hub, gone, live = MetricsHub(), GatewayMetrics(), GatewayMetrics()
    served(gone, 200, in_flight=2)
    await hub.report("gone", gone.snapshot())
    await hub.report_engine("gone", "# HELP vllm:x X.\n# TYPE vllm:x gauge\nvllm:x 1.0\n", 0)
    clock[0] += hub_module.STALE_S + 1
    page = await hub.render("live", live.snapshot())
    assert sum(values(page, "llm_gateway_requests_total").values()) == 1
    assert sum(values(page, "llm_gateway_in_flight_requests").values()) == 0
    assert "vllm:x" not in page


async def test_replicas_long_gone_are_kept_as_one_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas replaced one after another: their counts stay on the page,
    but the hub keeps one snapshot for all those long gone, not one each."""
    clock = [100.0]
    monkeypatch.setattr(hub_module.time, "monotonic", lambda: clock[0])
    hub = MetricsHub()
    for number in range(50):
        replica = GatewayMetrics()
        served(replica, 200, in_flight=1)
        await hub.report(f"replica-{number}", replica.snapshot())
        clock[0] += hub_module.STALE_S + 1
        await hub.render("scraped", GatewayMetrics().snapshot())
    clock[0] += hub_module.RETIRED_S
    page = await hub.render("scraped", GatewayMetrics().snapshot())
    assert sum(values(page, "llm_gateway_requests_total").values()) == 50
    assert sum(values(page, "llm_gateway_in_flight_requests").values()) == 0
    assert len(hub._gone) == 0 and len(hub._live) == 1


async def test_the_reporter_sends_news_at_once_and_otherwise_only_heartbeats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub_module, "HEARTBEAT_S", 0.2)
    sent: list[Any] = []
    version = [0]

    async def send(snapshot: Any) -> None:
        sent.append(snapshot)

    flushes = [0]
    reporter = MetricsReporter(
        send, lambda: version[0], lambda: version[0], lambda: flushes.__setitem__(0, flushes[0] + 1), interval_s=0.02
    )
    reporter.start()
    await asyncio.sleep(0.1)
    assert sent == [0]  # the first cycle always reports
    version[0] = 1
    await asyncio.sleep(0.05)
    assert sent == [0, 1]
    await asyncio.sleep(0.3)
    await reporter.stop()
    assert sent[:2] == [0, 1] and len(sent) in (3, 4)  # heartbeats only
    assert flushes[0] >= 10


async def test_a_stopping_replica_sends_what_it_served_since_its_last_report() -> None:
    # Its last requests (drained on the way out) were never counted.
    sent: list[Any] = []

    async def send(snapshot: Any) -> None:
        sent.append(snapshot)

    served = [3]
    reporter = MetricsReporter(send, lambda: served[0], lambda: served[0], interval_s=60)
    reporter.start()
    served[0] = 5
    await reporter.stop()
    assert sent == [5]


async def test_a_failed_send_is_retried_next_cycle() -> None:
    calls: list[int] = []

    async def send(snapshot: Any) -> None:
        calls.append(snapshot)
        if len(calls) == 1:
            raise RuntimeError("hub not up yet")

    reporter = MetricsReporter(send, lambda: 7, lambda: 7, interval_s=0.01)
    reporter.start()
    await asyncio.sleep(0.08)
    await reporter.stop()
    assert calls[:2] == [7, 7]


async def test_a_heartbeat_sends_the_last_collection_again_without_collecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Collecting may be the costly part: an idle replica must not pay it each beat.
    monkeypatch.setattr(hub_module, "HEARTBEAT_S", 0.05)
    sent: list[Any] = []
    collected = [0]
    version = [0]

    async def send(text: Any) -> None:
        sent.append(text)

    def collect() -> str:
        collected[0] += 1
        return f"page {collected[0]}"

    reporter = MetricsReporter(send, collect, lambda: version[0], interval_s=0.01)
    reporter.start()
    await asyncio.sleep(0.2)
    assert collected[0] == 1 and len(sent) >= 3 and set(sent) == {"page 1"}
    version[0] = 1
    await asyncio.sleep(0.05)
    await reporter.stop()
    assert collected[0] == 2 and sent[-1] == "page 2"


async def test_with_no_hub_the_reporter_only_flushes_and_collects_nothing() -> None:
    # A lone ingress replica keeps its own hub: its access log is still
    # flushed each cycle, and no snapshot is taken for nobody.
    collected, flushes = [0], [0]

    def collect() -> None:
        collected[0] += 1

    reporter = MetricsReporter(None, collect, lambda: 1, lambda: flushes.__setitem__(0, flushes[0] + 1), interval_s=0.01)
    reporter.start()
    await asyncio.sleep(0.1)
    await reporter.stop()
    assert collected[0] == 0 and flushes[0] >= 5


def test_what_replicas_call_runs_on_the_hubs_loop_beside_its_scrapes() -> None:
    # Serve runs a plain method on a thread pool: a report arriving during a
    # scrape changed the dict the scrape was merging ("dictionary changed
    # size during iteration", a 500 to Prometheus).
    import inspect

    for name in ("report", "report_engine", "engine_gone", "engine_asked", "render"):
        assert inspect.iscoroutinefunction(getattr(MetricsHub, name)), name
