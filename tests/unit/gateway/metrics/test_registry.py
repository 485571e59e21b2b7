"""gateway/metrics/registry.py: recording, merging across processes, the text format."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics.registry import Family, MetricsRegistry, merge, render, without_gauges

REQUESTS = Family("t_requests_total", "counter", "Requests.", ("route", "status"))
IN_FLIGHT = Family("t_in_flight", "gauge", "Now.", ("route",))
LATENCY = Family("t_latency_seconds", "histogram", "Latency.", ("route",), (0.1, 1.0))
FAMILIES = (REQUESTS, IN_FLIGHT, LATENCY)


def parsed(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_histogram_bounds_are_inclusive_and_cumulative() -> None:
    registry = MetricsRegistry(FAMILIES)
    latency = registry.histogram(LATENCY)
    for seconds in (0.05, 0.1, 0.5, 1.0, 3.0):
        latency.observe(("/a",), seconds)
    latency.observe(("/a",), 0.2, count=3)
    samples = parsed(render(FAMILIES, registry.snapshot()))
    bucket = lambda le: samples[("t_latency_seconds_bucket", frozenset({("route", "/a"), ("le", le)}))]  # noqa: E731
    assert (bucket("0.1"), bucket("1.0"), bucket("+Inf")) == (2, 7, 8)
    assert samples[("t_latency_seconds_count", frozenset({("route", "/a")}))] == 8
    assert samples[("t_latency_seconds_sum", frozenset({("route", "/a")}))] == pytest.approx(5.25)


def test_merge_sums_every_kind_label_set_by_label_set() -> None:
    one, two = MetricsRegistry(FAMILIES), MetricsRegistry(FAMILIES)
    one.counter(REQUESTS).inc(("/a", "200"), 2)
    two.counter(REQUESTS).inc(("/a", "200"), 3)
    two.counter(REQUESTS).inc(("/a", "500"))
    one.gauge(IN_FLIGHT).inc(("/a",))
    two.gauge(IN_FLIGHT).dec(("/a",))
    one.histogram(LATENCY).observe(("/a",), 0.05)
    two.histogram(LATENCY).observe(("/a",), 5.0)
    merged = merge([one.snapshot(), two.snapshot()])
    assert merged["t_requests_total"] == {("/a", "200"): 5, ("/a", "500"): 1}
    assert merged["t_in_flight"] == {("/a",): 0}
    assert merged["t_latency_seconds"][("/a",)] == ([1, 0, 1], 5.05)
    # The inputs are untouched: a hub merges the same snapshots again and again.
    assert one.snapshot()["t_latency_seconds"][("/a",)] == ([1, 0, 0], 0.05)


def test_a_snapshot_is_a_copy() -> None:
    registry = MetricsRegistry(FAMILIES)
    registry.histogram(LATENCY).observe(("/a",), 0.05)
    snapshot = registry.snapshot()
    registry.histogram(LATENCY).observe(("/a",), 0.05)
    assert snapshot["t_latency_seconds"][("/a",)][0] == [1, 0, 0]


def test_a_gone_process_keeps_its_counts_but_not_its_gauges() -> None:
    registry = MetricsRegistry(FAMILIES)
    registry.counter(REQUESTS).inc(("/a", "200"))
    registry.gauge(IN_FLIGHT).inc(("/a",))
    kept = without_gauges(registry.snapshot(), FAMILIES)
    assert "t_in_flight" not in kept and kept["t_requests_total"] == {("/a", "200"): 1}


def test_text_format_round_trips_with_escaped_labels() -> None:
    registry = MetricsRegistry(FAMILIES)
    registry.counter(REQUESTS).inc(('/q"x\\y\nz', "200"), 1.5)
    text = render(FAMILIES, registry.snapshot())
    assert "# TYPE t_requests_total counter" in text and "# TYPE t_in_flight gauge" in text
    assert parsed(text) == {("t_requests_total", frozenset({("route", '/q"x\\y\nz'), ("status", "200")})): 1.5}
