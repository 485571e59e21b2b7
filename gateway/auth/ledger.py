"""Per-key request and token counts over a sliding minute: reserve, then settle.

A request reserves one request and its most tokens (prompt plus the output
it may produce) before it is sent; when it ends it settles with the tokens it
really used and the rest is released. Admission is all or nothing and never
lets a key's counts pass its limits, however many requests arrive at once:
the ledger lives in one process and each reservation is one synchronous step.

The minute slides in slots of ``SLOT_S``: what is counted in a slot leaves
the window once the slot's end is a minute old, so a count leaves at most one
slot late (never early: limits are never exceeded).

A *lease* is a block of requests, tokens and places booked at once for one
ingress replica to admit from on its own until the end of the current or
next slot, and counted in that slot (so what it admits never leaves the
window early); what it did not use it gives back with ``release``. A lease takes at most half of what is free,
and none while a key is close to its limits, where every request is decided
here one by one.

A request whose client has left (``leave``) stops taking one of the key's
places at once, though it stays counted in flight until it settles: the
engine stops it within milliseconds, and the client that cancelled a stream
to ask again at once (a chat page's "stop", then "regenerate") is not told
its key is at its concurrency limit by its own request it no longer waits for.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 60.0
SLOT_S = 0.25


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None


@dataclass(frozen=True)
class Usage:
    """What a key has left now, for the ``x-ratelimit-*`` headers. ``reset``
    times are seconds until the key is back to its full limit."""

    limit_requests: int | None
    remaining_requests: int
    reset_requests_s: float
    limit_tokens: int | None
    remaining_tokens: int
    reset_tokens_s: float


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted: which limit (``requests``, ``tokens``
    or ``concurrent``), its value, what was used and requested, and in how
    many seconds it would fit (None: not as it stands)."""

    limit: str
    value: int
    used: int
    requested: int
    retry_after_s: float | None


@dataclass(frozen=True)
class Decision:
    reservation: int | None  # None when refused
    usage: Usage
    refusal: Refusal | None = None


@dataclass(frozen=True)
class Lease:
    """A block booked for one ingress replica: ``requests`` requests,
    ``tokens`` tokens and ``places`` places (each freed place is used again)
    to admit from until ``valid_s`` from now; ``usage`` is the key's counts
    with the block counted as used."""

    reservation: int
    requests: int
    tokens: int
    places: int
    valid_s: float
    usage: Usage


@dataclass
class _Slot:
    index: int
    requests: int = 0
    tokens: int = 0


@dataclass
class _Key:
    slots: deque[_Slot] = field(default_factory=deque)
    requests: int = 0
    tokens: int = 0
    in_flight: int = 0
    leaving: int = 0  # of those in flight, places whose clients left (``Ledger.leave``)

    @property
    def taken(self) -> int:
        """Places that count against the key's concurrency limit."""
        return self.in_flight - self.leaving


@dataclass
class _Reservation:
    key: str
    slot: int
    requests: int
    tokens: int
    places: int
    left: int = 0  # of its places, those whose clients left


class Ledger:
    """Counts of every key, in one place (the limiter replica)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _Key] = {}
        self._reservations: dict[int, _Reservation] = {}
        self._ids = itertools.count(1)

    def reserve(self, key: str, limits: Limits, tokens: int) -> Decision:
        """Admits one request of ``key`` that may use ``tokens``, or refuses it
        (counting nothing) when that would pass one of ``limits``."""
        now = self._clock()
        state = self._state(key, now)
        refusal = self._check(state, limits, tokens, now)
        if refusal is not None:
            return Decision(None, self._usage(state, limits, now), refusal)
        reservation = self._book(key, state, int(now / SLOT_S), 1, tokens, 1)
        return Decision(reservation, self._usage(state, limits, now))

    def check(self, key: str, limits: Limits) -> Decision | None:
        """The refusal of ``key``'s next request by its request limit, which
        refuses it whatever it asks until a slot leaves the window (None:
        not refused by it): such a request is not counted first."""
        now = self._clock()
        state = self._state(key, now)
        refusal = self._over_requests(state, limits, now)
        return None if refusal is None else Decision(None, self._usage(state, limits, now), refusal)

    def hold(self, key: str, tokens: int, left: bool = False) -> int:
        """Books a request of ``key`` admitted elsewhere and still running (by
        a ledger this one replaced), whatever the key's limits: it takes a
        place (none when its client ``left``) and ``tokens`` until it settles."""
        now = self._clock()
        reservation = self._book(key, self._state(key, now), int(now / SLOT_S), 1, tokens, 1)
        if left:
            self.leave(reservation)
        return reservation

    def recount(self, key: str, age_s: float, requests: int, tokens: int) -> None:
        """Counts ``requests`` and ``tokens`` of ``key`` that ended within the
        window (by a ledger this one replaced), as admitted ``age_s`` ago:
        they leave the window when they would have there, never earlier."""
        now = self._clock()
        if age_s < WINDOW_S:
            self._count(self._state(key, now), int((now - max(0.0, age_s)) / SLOT_S), requests, tokens)

    def lease(self, key: str, limits: Limits, requests: int, tokens: int) -> Lease | None:
        """Books up to ``requests`` requests and ``tokens`` tokens of ``key``
        for one ingress replica, at most half of what ``limits`` leave free;
        None when that is not even one request (or one token under a token
        limit), or when the current slot has too little time left."""
        now = self._clock()
        # It lasts to the end of this slot, or of the next when less than half of this one is left,
        # and is counted in the slot it ends in: what it admits never leaves the window early.
        index = int((now + SLOT_S / 2) / SLOT_S)
        valid = (index + 1) * SLOT_S - now
        state = self._state(key, now)
        if limits.rpm is not None:
            requests = min(requests, (limits.rpm - state.requests) // 2)
        places = requests
        if limits.max_concurrent is not None:
            places = min(places, (limits.max_concurrent - state.taken) // 2)
        if limits.tpm is not None:
            wanted, tokens = tokens, max(0, min(tokens, (limits.tpm - state.tokens) // 2))
            if wanted > 0 and tokens < 1:
                return None
        if requests < 1 or places < 1:
            return None
        reservation = self._book(key, state, index, requests, tokens, places)
        return Lease(reservation, requests, tokens, places, valid, self._usage(state, limits, now))

    def settle(self, reservation: int, used_tokens: int | None) -> str | None:
        """Ends a reservation: the tokens really used replace those reserved
        (while its slot is still in the window; None: the reserved tokens
        stay counted), and its places are freed. Returns its key (None:
        unknown, ignored)."""
        held = self._reservations.get(reservation)
        if held is None:
            return None
        back = 0 if used_tokens is None else held.tokens - used_tokens
        return self.release(reservation, tokens=back, end=True)

    def leave(self, reservation: int) -> str | None:
        """One place of a reservation is no longer waited for by its client:
        it stops counting against the concurrency limit, and stays in flight
        until the reservation settles. Returns its key (None: unknown, or no
        place of it left to free)."""
        held = self._reservations.get(reservation)
        if held is None or held.left >= held.places:
            return None
        held.left += 1
        state = self._keys.get(held.key)
        if state is not None:
            state.leaving += 1
        return held.key

    def release(
        self, reservation: int, requests: int = 0, tokens: int = 0, places: int = 0, end: bool = False,
        left: int = 0,
    ) -> str | None:
        """Gives back part of a reservation: ``requests`` never admitted,
        ``tokens`` not used (negative: used beyond it) and ``places`` freed,
        ``left`` of them places whose clients had left (``leave``); ``end``
        ends it, freeing every place it still holds. Returns its key (None:
        unknown, ignored)."""
        held = self._reservations.get(reservation)
        if held is None:
            return None
        if end:
            del self._reservations[reservation]
        state = self._keys.get(held.key)
        if state is None:
            return held.key
        requests = min(requests, held.requests)
        left = held.left if end else min(left, held.left, places)
        places = held.places if end else min(places, held.places - held.left + left)
        held.requests -= requests
        held.tokens -= tokens
        held.places -= places
        held.left -= left
        state.in_flight -= places
        state.leaving -= left
        for slot in reversed(state.slots):
            if slot.index == held.slot:
                slot.requests -= requests
                slot.tokens -= tokens
                state.requests -= requests
                state.tokens -= tokens
                break
            if slot.index < held.slot:
                break
        return held.key

    def _book(self, key: str, state: _Key, index: int, requests: int, tokens: int, places: int) -> int:
        """Counts ``requests`` requests and ``tokens`` in slot ``index`` (the
        current one, or the next for a lease), and takes ``places``."""
        self._count(state, index, requests, tokens)
        state.in_flight += places
        reservation = next(self._ids)
        self._reservations[reservation] = _Reservation(key, index, requests, tokens, places)
        return reservation

    @staticmethod
    def _count(state: _Key, index: int, requests: int, tokens: int) -> None:
        slots = state.slots
        at = len(slots)
        while at and slots[at - 1].index > index:
            at -= 1
        if at and slots[at - 1].index == index:
            slot = slots[at - 1]
        else:
            slot = _Slot(index)
            slots.insert(at, slot)
        slot.requests += requests
        slot.tokens += tokens
        state.requests += requests
        state.tokens += tokens

    def usage(self, key: str, limits: Limits) -> Usage:
        now = self._clock()
        return self._usage(self._state(key, now), limits, now)

    def in_flight(self, key: str) -> int:
        state = self._keys.get(key)
        return state.in_flight if state is not None else 0

    def _state(self, key: str, now: float) -> _Key:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        slots = state.slots
        while slots and _expiry(slots[0].index) <= now:
            gone = slots.popleft()
            state.requests -= gone.requests
            state.tokens -= gone.tokens
        return state

    def _check(self, state: _Key, limits: Limits, tokens: int, now: float) -> Refusal | None:
        if limits.max_concurrent is not None and state.taken >= limits.max_concurrent:
            return Refusal("concurrent", limits.max_concurrent, state.taken, 1, None)
        refusal = self._over_requests(state, limits, now)
        if refusal is not None:
            return refusal
        if limits.tpm is not None and state.tokens + tokens > limits.tpm:
            wait = None
            if tokens <= limits.tpm:
                wait = self._wait(state, "tokens", state.tokens + tokens - limits.tpm, now)
            return Refusal("tokens", limits.tpm, state.tokens, tokens, wait)
        return None

    def _over_requests(self, state: _Key, limits: Limits, now: float) -> Refusal | None:
        if limits.rpm is not None and state.requests + 1 > limits.rpm:
            wait = self._wait(state, "requests", state.requests + 1 - limits.rpm, now)
            return Refusal("requests", limits.rpm, state.requests, 1, wait)
        return None

    @staticmethod
    def _wait(state: _Key, what: str, excess: int, now: float) -> float | None:
        """Seconds until ``excess`` of ``what`` have left the window (None: the
        counts in the window never free that much: tokens still in flight)."""
        freed = 0
        for slot in state.slots:
            freed += getattr(slot, what)
            if freed >= excess:
                return max(0.0, _expiry(slot.index) - now)
        return None

    @staticmethod
    def _usage(state: _Key, limits: Limits, now: float) -> Usage:
        def reset(what: str) -> float:
            last = next((s for s in reversed(state.slots) if getattr(s, what) > 0), None)
            return max(0.0, _expiry(last.index) - now) if last is not None else 0.0

        return Usage(
            limit_requests=limits.rpm,
            remaining_requests=max(0, limits.rpm - state.requests) if limits.rpm else 0,
            reset_requests_s=reset("requests"),
            limit_tokens=limits.tpm,
            remaining_tokens=max(0, limits.tpm - state.tokens) if limits.tpm else 0,
            reset_tokens_s=reset("tokens"),
        )


def _expiry(index: int) -> float:
    """When what slot ``index`` counted leaves the window."""
    return (index + 1) * SLOT_S + WINDOW_S
