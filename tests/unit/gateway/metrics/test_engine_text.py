"""gateway/metrics/engine_text.py: vLLM's pages from several replicas on one page."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics.engine_text import relabel


def engine_page(tokens: int) -> str:
    registry = CollectorRegistry()
    counter = Counter("vllm:generation_tokens", "Tokens.", ["model_name"], registry=registry)
    counter.labels(model_name="m").inc(tokens)
    histogram = Histogram("vllm:e2e_request_latency_seconds", "E2E.", ["model_name"], registry=registry, buckets=(1.0,))
    histogram.labels(model_name="m").observe(0.5)
    Counter("process_other", "Not vLLM's.", registry=registry).inc()
    return generate_latest(registry).decode()


def test_each_replica_gets_its_label_and_each_family_its_header_once() -> None:
    page = relabel({"r1": engine_page(3), "r2": engine_page(5)})
    families = {f.name: f for f in text_string_to_metric_families(page)}
    assert set(families) == {"vllm:generation_tokens", "vllm:e2e_request_latency_seconds"}
    tokens = {s.labels["replica"]: s.value for s in families["vllm:generation_tokens"].samples}
    assert tokens == {"r1": 3, "r2": 5}
    assert page.count("# TYPE vllm:generation_tokens") == 1
    assert "_created" not in page and "process_other" not in page
    counts = [s for s in families["vllm:e2e_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert sorted(s.labels["replica"] for s in counts) == ["r1", "r2"]


def test_no_engines_no_text() -> None:
    assert relabel({}) == ""
