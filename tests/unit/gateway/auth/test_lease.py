"""gateway/auth/lease.py: when a replica admits from its lease, and how large a lease it asks for."""

from __future__ import annotations

from gateway.auth import ledger
from gateway.auth.lease import MAX_LEASE, Demand, Lease
from gateway.auth.ledger import Usage


def _lease(requests: int = 8, tokens: int = 800, places: int = 8, deadline: float = 10.0) -> Lease:
    usage = Usage(100, 50, 30.0, 10_000, 5_000, 30.0)
    return Lease(1, deadline, requests, tokens, places, usage, granted=requests)


def test_a_lease_admits_only_what_is_left_of_it_until_its_deadline() -> None:
    assert _lease().fits(800, now=9.9)
    assert not _lease().fits(801, now=0.0)  # more tokens than are left
    assert not _lease().fits(1, now=10.0)  # its slot has ended
    assert not _lease(requests=0).fits(1, now=0.0)
    assert not _lease(places=0).fits(1, now=0.0)
    closed = _lease()
    closed.open = False
    assert not closed.fits(1, now=0.0)


def test_a_lease_runs_low_at_a_quarter_of_its_requests_or_time() -> None:
    assert not _lease(requests=8).running_low(10, now=0.0)
    low = _lease(requests=8)
    low.requests = 2
    assert low.running_low(10, now=0.0)
    assert _lease().running_low(10, now=10.0 - ledger.SLOT_S / 8)


def test_a_lease_reports_the_keys_counts_with_what_is_left_of_it() -> None:
    usage = _lease(requests=8, tokens=800).remaining()
    assert (usage.remaining_requests, usage.remaining_tokens) == (58, 5_800)


def test_a_key_asks_for_twice_its_recent_rate_once_it_is_busy() -> None:
    demand = Demand()
    demand.note(0.0, 30)
    assert demand.want() == 0  # admitted once: no lease
    for _ in range(4):
        demand.note(0.0, 50)
    assert demand.want() == 10 and demand.tokens == 50
    demand.note(ledger.SLOT_S, 5)  # the next slot remembers the last one's count
    assert demand.want() == 10 and demand.tokens == 5
    demand.note(5 * ledger.SLOT_S, 5)  # slots skipped: the key went quiet
    assert demand.want() == 0
    for _ in range(5000):
        demand.note(5 * ledger.SLOT_S, 5)
    assert demand.want() == MAX_LEASE
