"""gateway/auth/ledger.py: reservations never pass a limit, settlements release exactly."""

from __future__ import annotations

import random

from gateway.auth.ledger import SLOT_S, WINDOW_S, Ledger, Limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_past_the_rpm_are_refused_and_say_when_they_fit() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    limits = Limits(rpm=3)
    assert all(ledger.reserve("k", limits, 0).reservation for _ in range(3))
    clock.now += 10
    refused = ledger.reserve("k", limits, 0)
    assert refused.reservation is None and refused.refusal is not None
    assert (refused.refusal.limit, refused.refusal.value, refused.refusal.used) == ("requests", 3, 3)
    # The first three leave the window a minute after their slot: 50 s from now, at most a slot late.
    assert WINDOW_S - 10 <= refused.refusal.retry_after_s <= WINDOW_S - 10 + SLOT_S
    clock.now += refused.refusal.retry_after_s
    assert ledger.reserve("k", limits, 0).reservation is not None


def test_tokens_are_reserved_then_settled_to_what_was_used() -> None:
    ledger = Ledger(Clock())
    limits = Limits(tpm=1000)
    first = ledger.reserve("k", limits, 600)
    assert first.usage.remaining_tokens == 400
    assert ledger.reserve("k", limits, 600).refusal is not None  # 1200 would pass 1000
    assert first.reservation is not None
    ledger.settle(first.reservation, 150)
    assert ledger.usage("k", limits).remaining_tokens == 850
    assert ledger.reserve("k", limits, 600).reservation is not None


def test_a_request_larger_than_the_limit_never_fits() -> None:
    refused = Ledger(Clock()).reserve("k", Limits(tpm=100), 101).refusal
    assert refused is not None and refused.limit == "tokens" and refused.retry_after_s is None


def test_concurrency_is_held_until_settled() -> None:
    ledger = Ledger(Clock())
    limits = Limits(max_concurrent=2)
    held = [ledger.reserve("k", limits, 0).reservation for _ in range(2)]
    assert ledger.reserve("k", limits, 0).refusal.limit == "concurrent"  # type: ignore[union-attr]
    ledger.settle(held[0], 0)  # type: ignore[arg-type]
    assert ledger.reserve("k", limits, 0).reservation is not None


def test_a_request_whose_client_left_frees_its_place_and_stays_in_flight_until_settled() -> None:
    ledger = Ledger(Clock())
    limits = Limits(tpm=1000, max_concurrent=1)
    held = ledger.reserve("k", limits, 300).reservation
    assert held is not None
    assert ledger.reserve("k", limits, 10).refusal.limit == "concurrent"  # type: ignore[union-attr]
    assert ledger.leave(held) == "k"
    assert ledger.leave(held) is None  # its one place is already free
    assert ledger.lease("k", limits, 4, 40) is None  # half of the one free place is none
    again = ledger.reserve("k", limits, 10).reservation
    assert again is not None
    assert ledger.in_flight("k") == 2  # the first still counts until the engine says what it generated
    assert ledger.release(held, places=1) == "k" and ledger.in_flight("k") == 2  # a left place goes at its end
    ledger.settle(held, 120)
    assert ledger.in_flight("k") == 1 and ledger.usage("k", limits).remaining_tokens == 1000 - 120 - 10
    assert ledger.reserve("k", limits, 10).refusal.limit == "concurrent"  # type: ignore[union-attr]
    ledger.settle(again, 10)  # type: ignore[arg-type]
    assert ledger.in_flight("k") == 0 and ledger.reserve("k", limits, 10).reservation is not None


def test_a_request_held_from_a_replaced_ledger_counts_whatever_the_limits_and_settles_like_any() -> None:
    ledger = Ledger(Clock())
    limits = Limits(tpm=1000, max_concurrent=1)
    held = ledger.hold("k", 1200)  # admitted by the ledger before this one, under its counts then
    assert ledger.in_flight("k") == 1 and ledger.usage("k", limits).remaining_tokens == 0
    assert ledger.reserve("k", limits, 1).refusal is not None
    ledger.settle(held, 100)
    assert ledger.reserve("k", limits, 1).reservation is not None
    gone = ledger.hold("g", 50, left=True)  # its client had left: in flight, taking no place
    assert ledger.in_flight("g") == 1 and ledger.reserve("g", Limits(max_concurrent=1), 0).reservation is not None
    ledger.settle(gone, 0)


def test_counts_of_a_replaced_ledger_leave_the_window_when_they_would_have_there() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    limits = Limits(rpm=3)
    ledger.recount("k", 50.0, 2, 0)  # ended, admitted 50 s ago
    ledger.recount("k", WINDOW_S + 1, 5, 0)  # out of the window already: not counted
    assert ledger.usage("k", limits).remaining_requests == 1
    clock.now += 10 - SLOT_S  # not before they are a minute old
    assert ledger.usage("k", limits).remaining_requests == 1
    clock.now += 2 * SLOT_S
    assert ledger.usage("k", limits).remaining_requests == 3


def test_keys_count_apart() -> None:
    ledger = Ledger(Clock())
    assert ledger.reserve("a", Limits(rpm=1), 0).reservation
    assert ledger.reserve("b", Limits(rpm=1), 0).reservation
    assert ledger.reserve("a", Limits(rpm=1), 0).refusal is not None


def test_random_bursts_never_overshoot_and_leave_exactly_the_settled_usage() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    limits = Limits(rpm=50, tpm=5000, max_concurrent=8)
    rng = random.Random(7)
    open_: list[tuple[int, int]] = []
    settled = 0
    admitted = 0
    for _ in range(2000):
        clock.now += rng.random() * 0.01
        if open_ and rng.random() < 0.5:
            reservation, reserved = open_.pop(rng.randrange(len(open_)))
            used = rng.randint(0, reserved)
            ledger.settle(reservation, used)
            settled += used
            continue
        want = rng.randint(1, 900)
        decision = ledger.reserve("k", limits, want)
        usage = ledger.usage("k", limits)
        assert limits.rpm - usage.remaining_requests <= limits.rpm
        assert usage.remaining_tokens >= 0
        refusal = decision.refusal
        if refusal is not None:  # refused only when admitting would pass a limit
            used = {"requests": admitted, "concurrent": len(open_)}.get(refusal.limit, refusal.used)
            assert used + refusal.requested > refusal.value
            continue
        if decision.reservation is not None:
            admitted += 1
            open_.append((decision.reservation, want))
            assert len(open_) <= 8
    for reservation, reserved in open_:
        ledger.settle(reservation, reserved)
        settled += reserved
    assert admitted <= limits.rpm  # all within one minute
    assert ledger.usage("k", limits).remaining_tokens == limits.tpm - settled
    assert ledger.in_flight("k") == 0


def test_counts_leave_the_window_and_the_usage_resets() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    limits = Limits(rpm=10, tpm=100)
    decision = ledger.reserve("k", limits, 40)
    assert decision.usage.remaining_requests == 9 and decision.usage.remaining_tokens == 60
    assert 0 < decision.usage.reset_tokens_s <= WINDOW_S + SLOT_S
    clock.now += WINDOW_S + SLOT_S
    usage = ledger.usage("k", limits)
    assert (usage.remaining_requests, usage.remaining_tokens, usage.reset_tokens_s) == (10, 100, 0.0)


def test_settling_twice_or_unknown_changes_nothing() -> None:
    ledger = Ledger(Clock())
    limits = Limits(tpm=100)
    r = ledger.reserve("k", limits, 50).reservation
    assert r is not None
    ledger.settle(r, 10)
    ledger.settle(r, 0)
    ledger.settle(12345, 0)
    assert ledger.usage("k", limits).remaining_tokens == 90


def test_an_abandoned_reservation_keeps_its_tokens() -> None:
    ledger = Ledger(Clock())
    limits = Limits(tpm=100, max_concurrent=1)
    r = ledger.reserve("k", limits, 50).reservation
    ledger.settle(r, None)  # type: ignore[arg-type]
    assert ledger.usage("k", limits).remaining_tokens == 50
    assert ledger.in_flight("k") == 0


def test_a_lease_takes_at_most_half_of_what_is_free_and_gives_back_the_rest() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    limits = Limits(rpm=100, tpm=1000, max_concurrent=40)
    lease = ledger.lease("k", limits, 500, 5000)
    assert lease is not None
    assert (lease.requests, lease.tokens, lease.places) == (50, 500, 20)  # half of what is free of each
    assert (lease.usage.remaining_requests, lease.usage.remaining_tokens) == (50, 500)
    assert ledger.in_flight("k") == 20
    # 5 requests admitted from it, using 30 tokens; the rest comes back.
    ledger.release(lease.reservation, requests=45, tokens=470, places=20, end=True)
    usage = ledger.usage("k", limits)
    assert (usage.remaining_requests, usage.remaining_tokens, ledger.in_flight("k")) == (95, 970, 0)


def test_no_lease_near_a_limit() -> None:
    ledger = Ledger(Clock())
    limits = Limits(rpm=3)
    assert ledger.reserve("k", limits, 0).reservation is not None
    assert ledger.lease("k", limits, 10, 0) is not None  # one of the two free
    assert ledger.lease("k", limits, 10, 0) is None  # half of one is none


def test_no_lease_of_requests_without_the_tokens_they_need() -> None:
    ledger = Ledger(Clock())
    limits = Limits(rpm=100, tpm=1000)
    assert ledger.reserve("k", limits, 999).reservation is not None  # one token left: half of it is none
    assert ledger.lease("k", limits, 10, 100) is None
    assert ledger.usage("k", limits).remaining_requests == 99  # nothing booked for it
    lease = ledger.lease("k", limits, 10, 0)  # requests that need no tokens still get a lease
    assert lease is not None and (lease.requests, lease.tokens) == (10, 0)


def test_a_lease_is_counted_in_the_slot_it_ends_in() -> None:
    clock = Clock()
    clock.now = 1000.0 + SLOT_S * 0.7  # less than half of this slot left
    ledger = Ledger(clock)
    limits = Limits(rpm=10)
    lease = ledger.lease("k", limits, 2, 0)
    assert lease is not None and SLOT_S < lease.valid_s <= 1.5 * SLOT_S
    assert ledger.reserve("k", limits, 0).reservation is not None  # in this slot, before the lease's
    # The exact request leaves the window first, the lease's block one slot later: never early.
    clock.now = 1000.0 + SLOT_S + WINDOW_S + 0.01
    assert ledger.usage("k", limits).remaining_requests == 10 - 2
    clock.now += SLOT_S
    assert ledger.usage("k", limits).remaining_requests == 10


def test_a_key_over_its_rpm_is_refused_by_a_check_that_counts_nothing() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    limits = Limits(rpm=2, tpm=1000, max_concurrent=1)
    assert ledger.check("k", limits) is None  # under its request limit
    first = ledger.reserve("k", limits, 300)
    assert first.reservation is not None
    assert ledger.check("k", limits) is None  # at its concurrency limit only: a place may come free
    ledger.settle(first.reservation, 300)
    second = ledger.reserve("k", limits, 0)
    assert second.reservation is not None
    ledger.settle(second.reservation, 0)
    checked, reserved = ledger.check("k", limits), ledger.reserve("k", limits, 0)
    assert checked is not None and checked == reserved  # the refusal the request would get, and its headers
    assert checked.refusal is not None and checked.refusal.limit == "requests"
    assert ledger.in_flight("k") == 0 and ledger.usage("k", limits).remaining_tokens == 700  # nothing counted
    clock.now += checked.refusal.retry_after_s or 0
    assert ledger.check("k", limits) is None
