"""gateway/auth/places.py: a request at its key's concurrency limit waits a moment for a place."""

from __future__ import annotations

import asyncio

import pytest

from gateway.auth import places
from gateway.auth.ledger import Limits
from gateway.auth.places import PlaceWaits


async def test_a_waiting_request_is_decided_again_each_time_its_key_frees_something(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(places, "PLACE_WAIT_S", 30.0)
    waits = PlaceWaits()
    asked: list[str] = []
    woken = asyncio.Event()

    def decided() -> bool:
        asked.append("k")
        woken.set()
        return len(asked) == 2  # the second place that comes free is taken

    waiting = asyncio.ensure_future(waits.until("k", decided))
    await asyncio.sleep(0)  # it starts waiting
    waits.freed("other")  # another key's place: not woken
    waits.freed("k")
    await asyncio.wait_for(woken.wait(), 5)
    assert asked == ["k"] and not waiting.done()
    waits.freed("k")
    assert await asyncio.wait_for(waiting, 5) is True
    assert waits.may_wait("k", Limits(max_concurrent=1))  # it no longer waits


async def test_no_more_requests_of_a_key_wait_than_it_has_places_and_none_waits_long() -> None:
    waits = PlaceWaits()
    limits = Limits(max_concurrent=2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = [asyncio.ensure_future(waits.until("k", lambda: False)) for _ in range(2)]
    await asyncio.sleep(0)
    assert not waits.may_wait("k", limits) and waits.may_wait("j", limits)
    assert not waits.may_wait("k", Limits(rpm=5))  # a key without a concurrency limit never waits
    assert await asyncio.gather(*waiting) == [False, False]
    assert places.PLACE_WAIT_S <= loop.time() - started < 5
    assert waits.may_wait("k", limits)
