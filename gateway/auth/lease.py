"""A busy key's blocks of the shared ledger, as one ingress replica holds
them (``gateway.auth.limiter.LimiterClient``): the lease it admits from on
its own, and how much the key asks of the replica."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from gateway.auth import ledger
from gateway.auth.ledger import Usage

LEASE_AFTER = 2  # a key admitted this often in one slot on a replica gets leases there
MAX_LEASE = 1024  # requests in one lease, at most


@dataclass
class Lease:
    """A block of the ledger this replica admits from on its own until ``deadline``."""

    reservation: int
    deadline: float  # loop time
    requests: int
    tokens: int
    places: int
    usage: Usage  # the key's counts when it was granted, the block counted as used
    metered: bool = True  # whether the key has a token limit (else tokens are not counted here)
    in_flight: int = 0
    open: bool = True
    timer: asyncio.TimerHandle | None = None
    granted: int = 0

    def fits(self, tokens: int, now: float) -> bool:
        return self.open and now < self.deadline and self.requests >= 1 and self.places >= 1 and self.tokens >= tokens

    def running_low(self, tokens: int, now: float) -> bool:
        """A quarter or less left of its requests, tokens or time, or no place left."""
        low = self.granted // 4
        return (self.requests <= low or self.places < 1 or self.tokens < tokens * max(1, low)
                or now > self.deadline - ledger.SLOT_S / 4)

    def remaining(self) -> Usage:
        """The key's counts as this replica knows them: what was left when
        the block was granted, plus what is left of the block."""
        usage = self.usage
        return Usage(
            usage.limit_requests, usage.remaining_requests + self.requests, usage.reset_requests_s,
            usage.limit_tokens, usage.remaining_tokens + max(0, self.tokens), usage.reset_tokens_s,
        )


@dataclass
class Demand:
    """How much one key asks of this replica: admissions in this slot and the last."""

    lease: Lease | None = None
    asking: dict[str, Any] | None = None  # the message that asks for a lease
    answered: asyncio.Future[None] | None = None  # done once that ask's reply has been taken in
    slot: int = -1
    count: int = 0
    last: int = 0
    tokens: int = 0  # the most tokens one request reserved, this slot
    # The last request decided in the ledger was refused for the key's concurrency limit: no lease
    # would have a place, and the key's requests each wait for a place there rather than behind one.
    at_limit: bool = False

    def note(self, now: float, tokens: int) -> None:
        slot = int(now / ledger.SLOT_S)
        if slot != self.slot:
            self.last = self.count if slot == self.slot + 1 else 0
            self.slot, self.count, self.tokens = slot, 0, 0
        self.count += 1
        self.tokens = max(self.tokens, tokens)

    def want(self) -> int:
        """Requests to ask a lease for: twice the recent rate (none when low)."""
        recent = max(self.count, self.last)
        return min(MAX_LEASE, 2 * recent) if recent >= LEASE_AFTER else 0
