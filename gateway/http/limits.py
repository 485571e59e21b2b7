"""Admission of a limited API key's request: reserve, answer OpenAI's way, settle.

A request of a key with ``rpm``, ``tpm`` or ``max_concurrent`` reserves one
request and the most tokens it may use in the shared ledger before it is
sent; over a limit it is answered 429 ``rate_limit_exceeded`` in OpenAI's
words, with ``Retry-After`` and ``retry-after-ms``. Every answer to such a
key carries OpenAI's ``x-ratelimit-*`` headers. When the request ends its
reservation settles with the tokens the model reported (a request cut short
before the model reported keeps what it reserved).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

from gateway.auth.keys import ApiKey
from gateway.auth.ledger import Limits, Refusal, Usage
from gateway.auth.places import PLACE_WAIT_S
from gateway.errors import RateLimitError, ServiceUnavailableError, TokenRateLimitError
from gateway.http.relay_outcome import ABANDONED_OUTCOME_S
from gateway.protocol.engine import Outcome

# An abandoned stream's replica reports what it generated within
# ``ABANDONED_OUTCOME_S``; past this its reservation settles whole.
UNSAID_SETTLE_S = ABANDONED_OUTCOME_S + 1.0

_NAMES = {
    "requests": "requests per min (RPM)",
    "tokens": "tokens per min (TPM)",
    "concurrent": "concurrent requests",
}
# A key at its concurrency limit has no known time to wait; clients are told this.
CONCURRENT_RETRY_MS = 1000


def limits_of(key: ApiKey) -> Limits:
    return Limits(key.rpm, key.tpm, key.max_concurrent)


def duration(seconds: float) -> str:
    """OpenAI's form of a reset time: ``12ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def rate_headers(usage: Usage) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers for the limits the key has."""
    headers: dict[str, str] = {}
    if usage.limit_requests is not None:
        headers["x-ratelimit-limit-requests"] = str(usage.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(usage.remaining_requests)
        headers["x-ratelimit-reset-requests"] = duration(usage.reset_requests_s)
    if usage.limit_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(usage.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(usage.remaining_tokens)
        headers["x-ratelimit-reset-tokens"] = duration(usage.reset_tokens_s)
    return headers


# The field that bounds a request's output, by endpoint, where leaving it
# out reserves the rest of the model's context window.
_BUDGET_FIELDS = {"chat": "max_completion_tokens", "responses": "max_output_tokens"}


def unbudgeted(endpoint: str, body: dict[str, Any]) -> str | None:
    """The output bound ``body`` leaves out, so that it reserves the rest of
    the context window (None: it sets one, or its endpoint needs none)."""
    field = _BUDGET_FIELDS.get(endpoint)
    if field is None or body.get(field) is not None or endpoint == "chat" and body.get("max_tokens") is not None:
        return None
    return field


def refused(
    refusal: Refusal, usage: Usage | None, key: ApiKey, model: str, unbounded: str | None = None
) -> RateLimitError:
    """The 429 for ``refusal``, in OpenAI's words; ``unbounded``: the output
    bound the request left out (see ``unbudgeted``), named where it is why
    the request can never fit."""
    name = _NAMES[refusal.limit]
    cls = TokenRateLimitError if refusal.limit == "tokens" else RateLimitError
    if refusal.limit == "tokens" and refusal.retry_after_s is None:
        why = (
            f" Without `{unbounded}` the request reserves the rest of the model's context window:"
            f" set `{unbounded}` to bound its output." if unbounded is not None else ""
        )
        error = cls(
            f"Request too large for {model} on API key {key.id} on {name}: Limit "
            f"{refusal.value}, Requested {refusal.requested}. The input or output tokens "
            f"must be reduced in order to run successfully.{why}"
        )
    else:
        if refusal.retry_after_s is None:
            wait_ms, when = CONCURRENT_RETRY_MS, "once one of the key's requests has finished"
        else:
            wait_ms = max(1, math.ceil(refusal.retry_after_s * 1000))
            when = f"in {duration(wait_ms / 1000)}"
        error = cls(
            f"Rate limit reached for {model} on API key {key.id} on {name}: Limit "
            f"{refusal.value}, Used {refusal.used}, Requested {refusal.requested}. "
            f"Please try again {when}.",
            retry_after_ms=wait_ms,
        )
    if usage is not None:
        error.extra_headers.update(rate_headers(usage))
    return error


class Admission:
    """One admitted request; ``settle`` ends its reservation (once)."""

    def __init__(self, limiter: Any, reservation: int, usage: Usage) -> None:
        self._limiter = limiter
        self._reservation: int | None = reservation
        self.headers = rate_headers(usage)

    def settle(self, outcome: Outcome | None) -> None:
        """``outcome``: what the model reported (None: unknown, the reserved tokens stay)."""
        if self._reservation is None:
            return
        reservation, self._reservation = self._reservation, None
        used = None if outcome is None else outcome.prompt_tokens + outcome.completion_tokens
        self._limiter.settle(reservation, used)

    def leave(self) -> None:
        """The client left before the end: the key's place is free at once,
        and the request settles when the model says what it generated."""
        if self._reservation is not None:
            self._limiter.leave(self._reservation)

    def left_unstarted(self) -> None:
        """A stream given up before its first byte: its place is free at once;
        it settles with what the replica says it generated (a request left
        in a replica's queue generated nothing), else whole once the replica
        could not say in time (``ABANDONED_OUTCOME_S``)."""
        if self._reservation is not None:
            self.leave()
            asyncio.get_running_loop().call_later(UNSAID_SETTLE_S, self.settle, None)


async def admit(limiter: Any, key: ApiKey, tokens: int, model: str, unbounded: str | None = None) -> Admission:
    """Reserves one request of ``key`` using at most ``tokens``; raises
    RateLimitError (429) over a limit (see ``refused`` for ``unbounded``),
    ServiceUnavailableError (503) when the ledger cannot be reached."""
    decision = await limiter.reserve(key.id, limits_of(key), tokens)
    if decision.refusal is not None or decision.reservation is None:
        assert decision.refusal is not None
        raise refused(decision.refusal, decision.usage, key, model, unbounded)
    return Admission(limiter, decision.reservation, decision.usage)


async def usage_headers(limiter: Any, key: ApiKey) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers of ``key`` as it stands, spending nothing;
    none while the ledger cannot be reached (what asks for them spends nothing)."""
    try:
        usage, _ = await limiter.usage(key.id, limits_of(key))
    except ServiceUnavailableError:
        return {}
    return rate_headers(usage)


class CountSlots:
    """At most ``max_concurrent`` requests of a key counted at once on this
    ingress replica. A token limit counts a request before admission (which
    checks the key's places), and a count may be a render on the model's
    replica: a key with one place sending hundreds of requests at once kept
    hundreds of renders running there, each then refused 429. As for places
    (``gateway.auth.places``), as many more wait up to ``PLACE_WAIT_S`` for
    a count to end; the others are refused at once, as over
    ``max_concurrent``."""

    def __init__(self) -> None:
        # By configured key id (bounded): its places when made, its counts, how many wait.
        self._slots: dict[str, tuple[int, asyncio.Semaphore]] = {}
        self._waiting: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def counting(self, key: ApiKey, limiter: Any, model: str) -> AsyncIterator[None]:
        """Holds one of ``key``'s counting slots (none to hold without a place
        limit); raises RateLimitError (429) where none comes free in time."""
        places = key.max_concurrent
        if places is None:
            yield
            return
        held = self._slots.get(key.id)
        if held is None or held[0] != places:  # (new, or its limit changed)
            held = self._slots[key.id] = (places, asyncio.Semaphore(places))
        slots = held[1]
        if slots.locked() and self._waiting.get(key.id, 0) >= places:
            raise await _over_places(limiter, key, model)
        self._waiting[key.id] = self._waiting.get(key.id, 0) + 1
        try:
            async with asyncio.timeout(PLACE_WAIT_S):
                await slots.acquire()
            acquired = True
        except TimeoutError:
            acquired = False
        finally:
            self._waiting[key.id] -= 1
            if not self._waiting[key.id]:
                del self._waiting[key.id]
        if not acquired:  # (no longer waiting while its refusal is made)
            raise await _over_places(limiter, key, model)
        try:
            yield
        finally:
            slots.release()


async def _over_places(limiter: Any, key: ApiKey, model: str) -> RateLimitError:
    """The 429 of a request of ``key`` beyond its places, with its key's headers where the ledger says them."""
    places = key.max_concurrent or 0
    error = refused(Refusal("concurrent", places, places, 1, None), None, key, model)
    error.extra_headers.update(await usage_headers(limiter, key))
    return error


async def refuse_early(limiter: Any, key: ApiKey, model: str) -> None:
    """Raises the RateLimitError (429) of a request its key's request limit
    refuses whatever it asks, before its tokens are counted (a count may be
    a render on the model's replica): a key over that limit costs no count."""
    if key.rpm is None or key.tpm is None:
        return  # (without a token limit, nothing is counted before admission)
    decision = await limiter.check(key.id, limits_of(key))
    if decision is not None and decision.refusal is not None:
        raise refused(decision.refusal, decision.usage, key, model)


def embedding_tokens(endpoint: str, body: dict[str, Any], window: int | None = None) -> int:
    """At most the tokens an embedding model's request holds, whichever
    endpoint it came by (``input``; a prediction's ``instances`` or
    ``inputs``; a V2 tensor's ``data``): a WordPiece or byte-level tokenizer
    makes no more tokens than characters (bytes), plus two markers per text;
    token ids are counted as they are. No input counts more than ``window``
    (the model's; None: unbounded), since the model refuses a longer one."""
    if endpoint == "embedding":
        value = body.get("input")
    elif endpoint == "predict":
        value = body.get("instances") if body.get("instances") is not None else body.get("inputs")
    else:
        tensors = body.get("inputs")
        first = tensors[0] if isinstance(tensors, list) and tensors else None
        value = first.get("data") if isinstance(first, dict) else None
    if isinstance(value, list) and not all(isinstance(item, int) for item in value):
        return sum(_most_in(item, window) for item in value)  # each item one input
    return _most_in(value, window)  # one input (a text, or a list of token ids)


def _most_in(value: Any, window: int | None) -> int:
    """At most the tokens of one input: a text, a token id, or a list of
    texts (a tensor's row, each text its own input) or of token ids (one input)."""
    if isinstance(value, str):
        return _capped(len(value.encode()) + 2, window)
    if isinstance(value, int):
        return 1
    if not isinstance(value, list):
        return 0
    ids = sum(1 for item in value if isinstance(item, int))
    return _capped(ids, window) + sum(_most_in(item, window) for item in value if isinstance(item, str))


def _capped(tokens: int, window: int | None) -> int:
    return tokens if window is None else min(tokens, window)
