"""What one ingress replica records about the requests it answers."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.metrics.families import (
    AB_ASSIGNMENTS,
    BATCH_SIZE,
    FAMILIES,
    IN_FLIGHT,
    INTER_TOKEN_LATENCY,
    OVERHEAD,
    REQUEST_DURATION,
    REQUESTS,
    TIME_TO_FIRST_TOKEN,
    TOKENS,
)
from gateway.metrics.registry import MetricsRegistry, Snapshot
from gateway.protocol.engine import Outcome


@dataclass(slots=True)
class RequestRecord:
    """One request as the gateway saw it; the dispatcher fills in the model's part.

    ``started`` and ``model_wait_s`` are ``time.perf_counter()`` seconds:
    the request's arrival, and the time spent waiting on the model before the
    response started (what the gateway's overhead leaves out).
    """

    request_id: str
    route: str
    started: float
    model: str = ""
    variant: str = ""
    model_wait_s: float = 0.0
    stream: bool = False
    handed_over: bool = False  # a stream the model replica wrote to the client's socket itself
    outcome: Outcome | None = None
    error: str | None = None
    key: str = ""  # the API key's id
    # What an error after the response started (a stream's error frame) stands
    # for: the status that went out was 200, the request's outcome is this.
    late_status: int | None = None
    counted: bool = False  # its outcome is in the metrics (a background stream's may come after it ended)


class GatewayMetrics:
    """The gateway's families for one process; ``version`` changes with every record."""

    def __init__(self) -> None:
        self.registry = MetricsRegistry(FAMILIES)
        self.version = 0
        self._requests = self.registry.counter(REQUESTS)
        self._duration = self.registry.histogram(REQUEST_DURATION)
        self._ttft = self.registry.histogram(TIME_TO_FIRST_TOKEN)
        self._itl = self.registry.histogram(INTER_TOKEN_LATENCY)
        self._tokens = self.registry.counter(TOKENS)
        self._in_flight = self.registry.gauge(IN_FLIGHT)
        self._overhead = self.registry.histogram(OVERHEAD)
        self._batch = self.registry.histogram(BATCH_SIZE)
        self._assignments = self.registry.counter(AB_ASSIGNMENTS)

    def snapshot(self) -> Snapshot:
        return self.registry.snapshot()

    def request_started(self, route: str) -> None:
        self.version += 1
        self._in_flight.inc((route,))

    def response_started(self, route: str, overhead_s: float) -> None:
        self.version += 1
        self._overhead.observe((route,), overhead_s)

    def request_finished(self, record: RequestRecord, status: int, duration_s: float) -> None:
        self.version += 1
        self._in_flight.dec((record.route,))
        self._requests.inc((record.route, record.model, record.variant, str(status), record.key))
        self._duration.observe((record.route, record.model, record.variant), duration_s)

    def assigned(self, alias: str, variant: str) -> None:
        self.version += 1
        self._assignments.inc((alias, variant))

    def answered(self, model: str, variant: str, outcome: Outcome, key: str = "") -> None:
        """Counts what the model reported about an answer the client is given
        (``key``: the API key's id)."""
        self.version += 1
        labels = (model, variant)
        if outcome.prompt_tokens:
            self._tokens.inc((model, variant, "prompt", key), outcome.prompt_tokens)
        if outcome.completion_tokens:
            self._tokens.inc((model, variant, "completion", key), outcome.completion_tokens)
        # (An Outcome from a replica of a version before it has no such slot.)
        if cached := getattr(outcome, "cached_tokens", 0):
            self._tokens.inc((model, variant, "cached", key), cached)
        if outcome.first_token_s is not None:
            self._ttft.observe(labels, outcome.first_token_s)
        if outcome.inter_token_counts:
            self._itl.merge(labels, outcome.inter_token_counts, outcome.inter_token_sum_s)
        if outcome.batch_size is not None:
            self._batch.observe((variant,), outcome.batch_size)
