"""gateway/http/deadlines.py: a request's bounds, its model's
``request_timeout_s`` and its ingress replica's stop, and which error ends it."""

from __future__ import annotations

import asyncio
import json

import pytest
from httpx import ASGITransport, AsyncClient

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
    assert closing_window_s(0.8) == 0.4 and closing_window_s(57) == 2.0
    ran = await asyncio.gather(unbounded, later, sooner)
    assert all(0.4 <= s < 0.8 for s in ran[:2]) and 0.19 <= ran[2] < 0.4, ran


async def test_a_bound_begun_after_the_stop_ends_with_it() -> None:
    stopping = Stopping()
    stopping.begin(0.6)
    assert 0.29 <= await ran_for(stopping, None) < 0.6


async def test_the_error_names_the_bound_that_came_first() -> None:
    stopping = Stopping()
    now = asyncio.get_running_loop().time()
    assert isinstance(stopping.error(now, 3), RequestTimeoutError)  # no stop: the model's limit
    stopping.begin(4)  # the stop's time: 2 s from now
    assert isinstance(stopping.error(now + 1, 3), RequestTimeoutError)  # the model's limit came first
    error = stopping.error(now + 3, 3)
    assert isinstance(error, ShuttingDownError) and (error.status_code, error.code) == (503, "shutting_down")
    assert "graceful_shutdown_s" in error.message and "stopped the request" in error.message
    assert error.retry_after_s == 1
    assert isinstance(stopping.error(None, None), ShuttingDownError)  # no limit of its own
    # A background response's stream: its replica generates on, and the client may retrieve it.
    assert "generated in the background" in stopping.error(None, None, background=True).message
    assert "retry" not in stopping.error(None, None, background=True).message


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


async def test_a_background_streams_client_is_told_its_response_goes_on() -> None:
    frames = [sse.frame({"type": "response.created", "sequence_number": 0}), 5.0, sse.DONE]
    app = make_app(FakeHandle(stream=frames))
    app.state.dispatcher.stopping.begin(0.4)
    transport = ASGITransport(app=app, raise_app_exceptions=False)
    async with AsyncClient(transport=transport, base_url="http://test") as client:
        body = {"model": "m", "input": "Hi", "stream": True, "background": True}
        response = await client.post("/responses", json=body)
    assert response.status_code == 200
    last = response.content.rstrip().split(b"\n\n")[-1]  # the Responses API's own error event
    assert last.startswith(b"event: error\ndata: "), last
    error = json.loads(last.split(b"data: ", 1)[1])
    assert error["code"] == "shutting_down" and "generated in the background" in error["message"], error
