"""models/llm/relay.py: an ingress that leaves before a stream's first frame
(its client hung up while the request was queued on the replica, or while
the engine prefilled its prompt) ends the request there, on the real relay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway import sse
from gateway.errors import OverloadedError
from gateway.http.relay import ReplicaRelay
from gateway.protocol.engine import EngineRequest, Outcome
from tests.unit.gateway.http.test_relay import CALL, Router, serve
from tests.unit.gateway.http.test_relay_routing import held_stream


async def test_an_ingress_that_leaves_before_the_first_frame_ends_the_engine_request() -> None:
    opened, aborted = asyncio.Event(), asyncio.Event()

    async def opener(request: EngineRequest) -> Any:
        async def stream() -> AsyncIterator[bytes]:
            opened.set()
            try:
                await asyncio.sleep(30)  # an engine busy with other requests, or a long prompt
                yield sse.frame({"n": 0})
            finally:
                aborted.set()

        return stream(), Outcome

    opening = asyncio.ensure_future(ReplicaRelay(Router(await serve(opener))).open(CALL))
    await asyncio.wait_for(opened.wait(), timeout=2)
    opening.cancel()  # the client left: the ingress closes the relay connection
    await asyncio.wait_for(aborted.wait(), timeout=2)
    assert opening.cancelled()


async def test_a_queued_request_whose_ingress_leaves_gives_its_place_up_and_never_starts() -> None:
    release, served = asyncio.Event(), []
    address = await serve(await held_stream(release, served, 1), max_ongoing=1, max_queued=1)
    streams = ReplicaRelay(Router(address))
    running = await streams.open(CALL)
    queued = asyncio.ensure_future(streams.open(CALL))
    await asyncio.sleep(0.05)  # reached the replica's queue
    assert not queued.done() and served == [1]
    queued.cancel()  # its client left while it waited
    await asyncio.gather(queued, return_exceptions=True)
    # Its place in the queue is free again: the next request waits there, not refused.
    deadline = asyncio.get_running_loop().time() + 2
    while True:
        later = asyncio.ensure_future(streams.open(CALL))
        await asyncio.sleep(0.05)
        if not later.done():
            break
        with pytest.raises(OverloadedError):  # the replica had not yet seen the first one leave
            later.result()
        assert asyncio.get_running_loop().time() < deadline, "the queue kept a request whose ingress left"
    release.set()
    assert b"".join([chunk async for chunk in running.chunks()]).endswith(sse.DONE)
    third = await asyncio.wait_for(later, timeout=2)
    assert b"".join([chunk async for chunk in third.chunks()]).endswith(sse.DONE)
    assert served == [1, 1]  # the request that left was never started
