"""The ledger of a gateway with one ingress replica, in that replica's
process: no hub is deployed, and admission is a call, not a round trip."""

from __future__ import annotations

from gateway.auth.ledger import Decision, Ledger, Limits, Usage
from gateway.auth.places import PlaceWaits, waits_for_place


class LocalLimiter:
    """A ledger in this process, behind ``LimiterClient``'s methods: for a
    gateway of one ingress replica (and tests, tools)."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger if ledger is not None else Ledger()
        self._waits = PlaceWaits()

    async def reserve(self, key: str, limits: Limits, tokens: int) -> Decision:
        decision = self.ledger.reserve(key, limits, tokens)
        if waits_for_place(decision) and self._waits.may_wait(key, limits):

            def decided() -> bool:
                nonlocal decision
                decision = self.ledger.reserve(key, limits, tokens)
                return not waits_for_place(decision)

            await self._waits.until(key, decided)
        return decision

    async def check(self, key: str, limits: Limits) -> Decision | None:
        return self.ledger.check(key, limits)

    async def usage(self, key: str, limits: Limits) -> tuple[Usage, int]:
        return self.ledger.usage(key, limits), self.ledger.in_flight(key)

    def settle(self, reservation: int, used_tokens: int) -> None:
        self._waits.freed(self.ledger.settle(reservation, used_tokens))

    def leave(self, reservation: int) -> None:
        self._waits.freed(self.ledger.leave(reservation))

    async def close(self) -> None:
        pass
