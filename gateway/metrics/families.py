"""Every metric the gateway exports (prefix ``llm_gateway_``), in one place.

Labels stay bounded: ``route`` is a route template (never a raw path),
``model`` a configured model or alias name ("" when the request named none
we serve), ``variant`` the concrete model that answered, ``status`` the HTTP
status. No user ids, cohort keys or prompts.
"""

from __future__ import annotations

from gateway.metrics.registry import Family

# vLLM's own boundaries (vllm.v1.metrics.buckets), so the two compare directly.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# Classical predicts take milliseconds, long generations minutes.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)

REQUESTS = Family(
    "llm_gateway_requests_total",
    "counter",
    "Requests answered, by route template, requested model, serving variant, HTTP "
    "status (499: the client hung up first) and API key id (empty: no key).",
    ("route", "model", "variant", "status", "key"),
)
REQUEST_DURATION = Family(
    "llm_gateway_request_duration_seconds",
    "histogram",
    "Time from a request's arrival at the gateway to its last byte.",
    ("route", "model", "variant"),
    DURATION_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Family(
    "llm_gateway_time_to_first_token_seconds",
    "histogram",
    "Time from a request's arrival at the model replica to its first generated token.",
    ("model", "variant"),
    TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = Family(
    "llm_gateway_inter_token_latency_seconds",
    "histogram",
    "Time between consecutive generated tokens (one observation per token after the first).",
    ("model", "variant"),
    ITL_BUCKETS,
)
TOKENS = Family(
    "llm_gateway_tokens_total",
    "counter",
    "Tokens in the usage of answered requests: kind `prompt` or `completion`, by API "
    "key id (empty: no key); kind `cached`: of the prompt tokens, those found in the "
    "engine's prefix cache.",
    ("model", "variant", "kind", "key"),
)
IN_FLIGHT = Family(
    "llm_gateway_in_flight_requests",
    "gauge",
    "Requests the gateway is answering now.",
    ("route",),
)
OVERHEAD = Family(
    "llm_gateway_overhead_seconds",
    "histogram",
    "Time a request spent in the gateway before its response started, apart from "
    "waiting on the model.",
    ("route",),
    OVERHEAD_BUCKETS,
)
BATCH_SIZE = Family(
    "llm_gateway_batch_size",
    "histogram",
    "Requests per batch on batched (classical) models; `model` is the concrete model that ran "
    "the batch (one batch may hold requests sent to it under several aliases).",
    ("model",),
    BATCH_BUCKETS,
)
AB_ASSIGNMENTS = Family(
    "llm_gateway_ab_assignments_total",
    "counter",
    "Requests an alias assigned to each of its variants.",
    ("route", "variant"),
)

FAMILIES = (
    REQUESTS,
    REQUEST_DURATION,
    TIME_TO_FIRST_TOKEN,
    INTER_TOKEN_LATENCY,
    TOKENS,
    IN_FLIGHT,
    OVERHEAD,
    BATCH_SIZE,
    AB_ASSIGNMENTS,
)
