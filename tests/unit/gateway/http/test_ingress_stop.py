"""gateway/http/ingress.py: a stopping ingress replica ends before Serve
kills it, and what it still serves near the end of its grace is stopped
with an error in its API's shape, not cut off."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import sse
from gateway.config import FrontDoorConfig
from gateway.http import ingress
from gateway.http.deadlines import Stopping
from gateway.http.front_door import FrontDoor
from gateway.http.ingress import GatewayIngress
from tests.unit.gateway.http.test_dispatch import FakeHandle, make_app
from tests.unit.gateway.http.test_front_door import split


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, float | None]] = []

    async def stop(self, grace_s: float | None = None) -> None:
        self.events.append(("stop", grace_s))

    def flush(self) -> None:
        self.events.append(("flush", None))


def stopping_replica(grace_s: float, front_door: Any, dispatcher: Any, recorder: Recorder) -> SimpleNamespace:
    """The replica's own attributes, without Serve's wrapper class around it
    (``recorder``: its metrics reporter and access log)."""
    config = FrontDoorConfig.model_validate({"ingress": {"graceful_shutdown_s": grace_s}})
    state = SimpleNamespace(front_door=config, access_log=recorder, dispatcher=dispatcher)
    return SimpleNamespace(_front_door=front_door, _reporter=recorder, _state=state)


@pytest.mark.parametrize(("grace", "front_door_grace"), [(60.0, 57.0), (4.5, 1.5), (2.0, 1.0)])
async def test_the_front_door_stops_within_serves_grace_and_the_access_log_is_written(
    grace: float, front_door_grace: float
) -> None:
    # Serve kills the replica once ``graceful_shutdown_s`` has passed since it
    # asked it to stop, after its own 2 s drain loop: the front door given the
    # whole grace was killed mid-stop and buffered access-log lines were lost.
    recorder = Recorder()
    replica = stopping_replica(grace, recorder, SimpleNamespace(stopping=Stopping()), recorder)
    await GatewayIngress.stop(replica)
    # Flushed before the last report too: it may wait on a hub being removed until Serve kills the replica.
    assert recorder.events == [("stop", front_door_grace), ("flush", None), ("stop", None), ("flush", None)]
    assert grace - front_door_grace >= min(ingress.STOP_MARGIN_S, grace - 1.0)


def chunked_body(raw: bytes) -> bytes:
    """A chunked body's bytes; AssertionError unless it ends with its last chunk."""
    body = b""
    while True:
        size, _, raw = raw.partition(b"\r\n")
        assert size, "no last chunk: the body was cut off"
        length = int(size, 16)
        if length == 0:
            assert raw == b"\r\n", "no last chunk: the body was cut off"
            return body
        body, raw = body + raw[:length], raw[length + 2:]


async def exchange(port: int, body: dict[str, Any]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /chat HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(data), data))
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("handoff", [True, False], ids=["handed-off", "relayed"])
async def test_requests_still_running_at_the_end_of_the_grace_are_stopped_with_a_503(handoff: bool) -> None:
    # Cancelled by uvicorn at the end of its grace, a whole answer got a
    # plain-text 500 (logged 499) and a stream ended without its last chunk.
    frames = [sse.frame({"n": 0}), *([0.1, sse.frame({"n": 1})] * 100), sse.DONE]  # 10 s
    streaming, whole = FakeHandle(stream=frames), FakeHandle(unary=b"{}", delay=10)
    app = make_app(handles={"s": streaming, "w": whole})
    dispatcher = app.state.dispatcher
    dispatcher.table.model("s").client.relay._handoff = handoff
    door = FrontDoor(app, "127.0.0.1", 0, read_timeout_s=5)
    await door.start()
    stream = asyncio.ensure_future(exchange(door.port, {"model": "s", "stream": True}))
    answer = asyncio.ensure_future(exchange(door.port, {"model": "w"}))
    while len(whole.responses) < 1 or len(streaming.calls) < 1:
        await asyncio.sleep(0.01)
    await GatewayIngress.stop(stopping_replica(4.0, door, dispatcher, Recorder()))  # the front door's grace: 1 s

    status, headers, raw = split(await stream)
    assert status == 200
    events = sse.parse(chunked_body(raw))
    assert events[0] == {"n": 0} and events[-1] is None  # [DONE]
    assert events[-2]["error"]["code"] == "shutting_down"
    assert "Please retry" in events[-2]["error"]["message"]

    status, headers, raw = split(await answer)
    assert status == 503
    assert json.loads(raw)["error"]["code"] == "shutting_down"
    assert "retry-after" in headers
    assert whole.responses[0].cancelled  # the engine request was stopped
    counted = app.state.metrics.snapshot()["llm_gateway_requests_total"]
    assert counted == {("/chat", "s", "s", "503", ""): 1, ("/chat", "w", "w", "503", ""): 1}
