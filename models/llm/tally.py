"""Counts an LLM request's tokens and times them while the engine answers it."""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from gateway.metrics.families import ITL_BUCKETS
from gateway.protocol.engine import Outcome


class GenerationTally:
    """Filled in by the engine as outputs arrive; read once the answer is complete.

    Times are seconds; ``started`` is the wall clock (``time.time()``) when the
    replica received the request, the origin of the time to first token.
    """

    __slots__ = (
        "started", "prompt_tokens", "completion_tokens", "first_token_s", "continues", "error", "_gaps", "_gap_sum",
        "unseen", "cached_tokens",
    )

    def __init__(self, started: float | None = None) -> None:
        self.started = time.time() if started is None else started
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0  # of the prompt's, found in the engine's prefix cache
        self.first_token_s: float | None = None
        # Set by an engine whose generation goes on after it has answered (a
        # background response): done when the tally is complete.
        self.continues: asyncio.Future[Any] | None = None
        # The error that ended the answer after its first byte: its code and status.
        self.error: tuple[str, int] | None = None
        # Engine requests whose outputs come only once they end (non-streaming):
        # each asks the engine what it has used so far (prompt, generated tokens).
        self.unseen: set[Callable[[], tuple[int, int] | None]] = set()
        self._gaps: list[int] | None = None  # tokens per inter-token bucket, once one came
        self._gap_sum = 0.0

    def first_token(self, at: float | None = None) -> None:
        """The first token exists (at wall-clock ``at``, default now); later calls are ignored."""
        if self.first_token_s is None:
            self.first_token_s = max(0.0, (time.time() if at is None else at) - self.started)

    def gaps(self, seconds: float, tokens: int) -> None:
        """``tokens`` tokens each came ``seconds`` after the one before; counted
        into the inter-token histogram's buckets here (``le`` bounds inclusive)."""
        if tokens <= 0:
            return
        seconds = max(0.0, seconds)
        if self._gaps is None:
            self._gaps = [0] * (len(ITL_BUCKETS) + 1)
        self._gaps[bisect_left(ITL_BUCKETS, seconds)] += tokens
        self._gap_sum += seconds * tokens

    def count_unseen(self) -> None:
        """Counts what the engine requests that have shown no output yet have
        used so far: called before they are stopped (a whole answer whose
        caller left), as the engine forgets a request once stopped."""
        for unseen in list(self.unseen):
            used = unseen()
            if used is not None:
                self.prompt_tokens += used[0]
                self.completion_tokens += used[1]
        self.unseen.clear()

    def outcome(self) -> Outcome:
        return Outcome(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            first_token_s=self.first_token_s,
            inter_token_counts=tuple(self._gaps or ()),
            inter_token_sum_s=self._gap_sum,
            error=self.error[0] if self.error is not None else None,
            error_status=self.error[1] if self.error is not None else None,
        )

    def failed(self, code: str | None, status: int) -> None:
        """The answer ended with an error after its first byte (the first one counts)."""
        if self.error is None:
            self.error = (code or "error", status)
