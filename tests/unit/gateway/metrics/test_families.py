"""gateway/metrics/families.py: names the issue fixes, vLLM's buckets, bounded labels."""

from __future__ import annotations

from gateway.metrics.families import FAMILIES, INTER_TOKEN_LATENCY, TIME_TO_FIRST_TOKEN


def test_token_timings_use_vllms_own_bucket_boundaries() -> None:
    from vllm.v1.metrics.buckets import INTER_TOKEN_LATENCY_BUCKETS, TIME_TO_FIRST_TOKEN_BUCKETS

    assert TIME_TO_FIRST_TOKEN.buckets == tuple(TIME_TO_FIRST_TOKEN_BUCKETS)
    assert INTER_TOKEN_LATENCY.buckets == tuple(INTER_TOKEN_LATENCY_BUCKETS)


def test_families_and_their_labels() -> None:
    assert {f.name: f.labels for f in FAMILIES} == {
        "llm_gateway_requests_total": ("route", "model", "variant", "status", "key"),
        "llm_gateway_request_duration_seconds": ("route", "model", "variant"),
        "llm_gateway_time_to_first_token_seconds": ("model", "variant"),
        "llm_gateway_inter_token_latency_seconds": ("model", "variant"),
        "llm_gateway_tokens_total": ("model", "variant", "kind", "key"),
        "llm_gateway_in_flight_requests": ("route",),
        "llm_gateway_overhead_seconds": ("route",),
        "llm_gateway_batch_size": ("model",),
        "llm_gateway_ab_assignments_total": ("route", "variant"),
    }
    for family in FAMILIES:
        assert (family.kind == "histogram") == bool(family.buckets)
        assert list(family.buckets) == sorted(set(family.buckets))
