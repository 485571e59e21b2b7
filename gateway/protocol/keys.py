"""`GET /v1/key` shape: the caller's own key, its limits and what is left of them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class KeyLimits(BaseModel):
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None


class KeyUsage(BaseModel):
    """The key's counts in the shared ledger now, as the ``x-ratelimit-*``
    headers give them (``None``: no such limit); ``in_flight``: requests
    admitted and not yet ended (with blocks booked ahead by ingress
    replicas, which are given back within half a second when unused)."""

    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    in_flight: int


class KeyInfo(BaseModel):
    object: Literal["api_key"] = "api_key"
    id: str
    models: list[str]
    expires_at: int | None = None  # epoch seconds
    limits: KeyLimits
    usage: KeyUsage | None = None  # None: the key has no limits, nothing is counted
