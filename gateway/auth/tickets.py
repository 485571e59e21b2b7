"""An ingress replica's admitted requests, as the shared ledger knows them
(``gateway.auth.limiter.LimiterClient``), and how a new ledger learns them.

The ledger lives in the hub's replica, in memory. When that replica dies,
Serve starts a new one with an empty ledger; the requests the ingress
replicas admitted are still running. Each ingress replica, when it connects
to the new ledger, first tells it what it has in flight (``restore``): each
is booked there again, under the ticket the replica knows it by, so a key at
its concurrency limit stays there and what they use is settled where it is
counted; and what ended within the window is counted there again, so the
minute's request and token limits hold too. A reservation of the old ledger is never named to the new one: its
numbers start again from one and belong to other requests there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from gateway.auth import ledger
from gateway.auth.lease import Lease


@dataclass(slots=True)
class Ticket:
    """One admitted request: its key, the tokens reserved for it, and the
    ledger connection that knows it (None: none does now, it was lost).
    On that connection it is its own ``reservation``, or taken from
    ``lease``, or (neither) booked under its ticket by ``restore``."""

    key: str
    tokens: int
    connection: int | None
    admitted: float = 0.0  # loop time
    reservation: int | None = None
    lease: Lease | None = None

    def address(self, ticket: int) -> dict[str, int]:
        """How a message names it to the ledger (not for one taken from a lease)."""
        return {"r": self.reservation} if self.reservation is not None else {"t": ticket}


class Tickets:
    """The admitted requests of one ``LimiterClient``, by ticket."""

    def __init__(self) -> None:
        self._held: dict[int, Ticket] = {}
        self._ids = itertools.count(1)
        self.left: dict[int, str] = {}  # tickets whose place was freed before they settled (``leave``)
        # Per key, per slot of admission: the requests that ended there and the tokens they used.
        self._ended: dict[str, dict[int, list[int]]] = {}

    def add(self, held: Ticket) -> int:
        ticket = next(self._ids)
        self._held[ticket] = held
        return ticket

    def get(self, ticket: int) -> Ticket | None:
        return self._held.get(ticket)

    def pop(self, ticket: int) -> Ticket | None:
        return self._held.pop(ticket, None)

    def ended(self, held: Ticket, used: int | None) -> None:
        """Counts a request that ended, with the tokens it used (None: those
        reserved), for as long as a new ledger would still count it."""
        slots = self._ended.get(held.key)
        if slots is None:
            slots = self._ended[held.key] = {}
        slot = int(held.admitted / ledger.SLOT_S)
        counts = slots.get(slot)
        if counts is None:
            oldest = slot - int(ledger.WINDOW_S / ledger.SLOT_S) - 1
            for gone in [s for s in slots if s < oldest]:
                del slots[gone]
            counts = slots[slot] = [0, 0]
        counts[0] += 1
        counts[1] += held.tokens if used is None else used

    def lost(self, connection: int) -> bool:
        """``connection`` ended: the ledger behind it has ended what it knew
        of this replica, or is gone; its requests are known to none now.
        Whether it knew any."""
        some = False
        for held in self._held.values():
            if held.connection == connection:
                held.connection = None
                held.reservation = held.lease = None
                some = True
        return some

    def restore(self, connection: int, now: float | None = None) -> dict[str, Any] | None:
        """The message that books, on new ``connection``, every request known
        to no ledger (before anything else is sent on it), and with ``now``
        (loop time; for a ledger that replaces one) what ended within the
        window; None: there is none."""
        known: list[list[Any]] = []
        for ticket, held in self._held.items():
            if held.connection is None:
                held.connection = connection
                known.append([ticket, held.key, held.tokens, ticket in self.left])
        window: list[list[Any]] = []
        if now is not None:
            for key, slots in self._ended.items():
                for slot, (requests, tokens) in slots.items():
                    age = now - (slot + 1) * ledger.SLOT_S  # from the slot's end: never counted out early
                    if age < ledger.WINDOW_S:
                        window.append([key, round(age, 3), requests, tokens])
        return {"op": "restore", "held": known, "window": window} if known or window else None
