"""gateway/http/deadlines.py: a request's bounds, its model's
``request_timeout_s`` and its ingress replica's stop, and which error ends it."""

from __future__ import annotations

import asyncio

import pytest

from gateway import sse
from gateway.errors import RequestTimeoutError, ShuttingDownError
from gateway.http.deadlines import Stopping, closing_window_s
from gateway.routing.table import Alias
from gateway.routing.weighted import Variant
from tests.unit.gateway.http.test_dispatch import FakeHandle, make_app, post


async def ran_for(stopping: Stopping, deadline_in_s: float | None) -> float:
    """How long a bound from now with ``deadline_in_s`` lets its body run, up to 5 s."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = None if deadline_in_s is None else started + deadline_in_s
    with pytest.raises(TimeoutError):
        async with stopping.bounded(deadline):
            await asyncio.sleep(5)
    return loop.time() - started


async def test_a_stop_ends_running_bounds_with_or_without_a_deadline_but_never_later_than_theirs() -> None:
    stopping = Stopping()
    unbounded = asyncio.ensure_future(ran_for(stopping, None))
    later = asyncio.ensure_future(ran_for(stopping, 3.0))
    sooner = asyncio.ensure_future(ran_for(stopping, 0.2))
    await asyncio.sleep(0.05)
    stopping.begin(0.8)  # the requests end 0.4 s from now: half the grace is for their errors
    assert closing_window_s(0.8) == 0.4 and closing_window_s(57) == 1.0
    ran = await asyncio.gather(unbounded, later, sooner)
    assert [round(s, 1) for s in ran] == [0.5, 0.5, 0.2]


async def test_a_bound_begun_after_the_stop_ends_with_it_and_each_ending_names_its_cause() -> None:
    stopping = Stopping()
    assert isinstance(stopping.error(3), RequestTimeoutError)  # no stop yet: the model's limit
    stopping.begin(0.6)
    assert isinstance(stopping.error(3), RequestTimeoutError)  # before the stop's time
    assert round(await ran_for(stopping, None), 1) == 0.3
    error = stopping.error(3)
    assert isinstance(error, ShuttingDownError) and (error.status_code, error.code) == (503, "shutting_down")
    assert "graceful_shutdown_s" in error.message and error.retry_after_s == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_stopped_with_its_replica_is_not_tried_on_the_next_variant(stream: bool) -> None:
    # The variant is not down: the replica taking the request is stopping, and
    # the time it had is spent. The client's retry reaches a replica that is not.
    first = FakeHandle(unary=b"{}", stream=[sse.frame({"n": 0}), 5.0, sse.DONE], delay=5, head_delay=5)
    second = FakeHandle(unary=b'{"served":"b"}', stream=[sse.frame({"served": "b"}) + sse.DONE])
    app = make_app(handles={"a": first, "b": second}, alias=Alias([Variant("a", 100), Variant("b", 1)], fallback=True))
    app.state.dispatcher.stopping.begin(0.4)
    response = await post(app, {"model": "r", "stream": stream})
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert response.headers["x-gateway-variant"] == "a"
    assert second.calls == []
