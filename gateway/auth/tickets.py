"""An ingress replica's admitted requests, as the shared ledger knows them
(``gateway.auth.limiter.LimiterClient``), and how a new ledger learns them.

The ledger lives in the hub's replica, in memory. When that replica dies,
Serve starts a new one with an empty ledger; the requests the ingress
replicas admitted are still running. Each ingress replica, when it connects
to the new ledger, first tells it what it has in flight (``restore``): each
is booked there again, under the ticket the replica knows it by, so a key at
its concurrency limit stays there and what they use is settled where it is
counted. A reservation of the old ledger is never named to the new one: its
numbers start again from one and belong to other requests there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

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

    def add(self, held: Ticket) -> int:
        ticket = next(self._ids)
        self._held[ticket] = held
        return ticket

    def get(self, ticket: int) -> Ticket | None:
        return self._held.get(ticket)

    def pop(self, ticket: int) -> Ticket | None:
        return self._held.pop(ticket, None)

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

    def restore(self, connection: int) -> dict[str, Any] | None:
        """The message that books, on new ``connection``, every request known
        to no ledger (before anything else is sent on it); None: there is none."""
        known: list[list[Any]] = []
        for ticket, held in self._held.items():
            if held.connection is None:
                held.connection = connection
                known.append([ticket, held.key, held.tokens, ticket in self.left])
        return {"op": "restore", "held": known} if known else None
