"""A request at its key's concurrency limit waits a moment for a place.

A client that cancels a stream and asks again at once (a chat page's "stop",
then "regenerate"; an SDK that closes a stream and sends the next request on
another kept connection) sends its next request before the gateway has seen
the first one go: the two arrive within a millisecond of each other, and the
gateway learns of the hang-up a few event-loop turns later. Refused at once,
such a request was answered 429 with its key's only place held by a request
its client no longer waited for. So a request refused only for
``max_concurrent`` waits up to ``PLACE_WAIT_S`` for one of the key's places
to come free (a request settling, or its client leaving) and is decided
again each time one does; no more of a key's requests wait than it has
places, and the others are refused at once, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.auth.ledger import Decision, Limits

PLACE_WAIT_S = 0.25


def waits_for_place(decision: Decision) -> bool:
    """Whether ``decision`` is a refusal for the concurrency limit alone."""
    refusal = decision.refusal
    return refusal is not None and refusal.limit == "concurrent"


class PlaceWaits:
    """The requests of each key waiting for a place, woken when one frees."""

    def __init__(self) -> None:
        self._woken: dict[str, asyncio.Future[None]] = {}  # per key: done when something of it comes back
        self._waiting: dict[str, int] = {}

    def may_wait(self, key: str, limits: Limits) -> bool:
        """Fewer of the key's requests wait than it has places."""
        return self._waiting.get(key, 0) < (limits.max_concurrent or 0)

    async def until(self, key: str, decided: Callable[[], bool]) -> bool:
        """Calls ``decided()`` each time one of ``key``'s places may have come
        free, until it says True (then True) or ``PLACE_WAIT_S`` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PLACE_WAIT_S
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            while (left := deadline - loop.time()) > 0:
                woken = self._woken.get(key)
                if woken is None:
                    woken = self._woken[key] = loop.create_future()
                await asyncio.wait({woken}, timeout=left)
                if woken.done() and decided():
                    return True
            return False
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
                self._woken.pop(key, None)

    def freed(self, key: str | None) -> None:
        """Something of ``key`` came back: its waiting requests are decided again."""
        woken = self._woken.pop(key or "", None)
        if woken is not None and not woken.done():
            woken.set_result(None)
