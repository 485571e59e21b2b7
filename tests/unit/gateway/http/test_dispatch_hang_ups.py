"""gateway/http/dispatch.py: a client that leaves before its answer starts
(seen by the app, or its task cancelled by the server) stops the model's work."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway import sse
from tests.unit.gateway.http.test_dispatch import FakeHandle, make_app

SCOPE = {
    "type": "http", "method": "POST", "path": "/chat", "raw_path": b"/chat",
    "headers": [(b"content-type", b"application/json")], "query_string": b"",
    "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("c", 1),
    "root_path": "",
}


async def model_work_stops(handle: FakeHandle) -> None:
    deadline = asyncio.get_running_loop().time() + 2
    while not handle.responses or not handle.responses[0].cancelled:
        assert asyncio.get_running_loop().time() < deadline, "the model's work went on"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
async def test_client_hang_up_before_the_answer_cancels_the_model_call(stream: bool) -> None:
    """A whole answer not ready, or a stream whose first frames (its head)
    are not: the gateway's own front door says the client left only through
    ``receive``."""
    handle = FakeHandle(unary=b"{}", delay=5) if not stream else FakeHandle(stream=[sse.DONE], head_delay=5)
    app = make_app(handle)
    body = json.dumps({"model": "m", "stream": stream}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        if len(messages) == 1:
            await asyncio.sleep(0.05)  # the client leaves a moment after sending
        return messages.pop(0)

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(dict(SCOPE), receive, send), timeout=2)
    assert sent[0]["status"] == 499
    # The ingress closed its connection; the replica cancels the work it was doing.
    await model_work_stops(handle)
    assert app.state.metrics.snapshot()["llm_gateway_requests_total"] == {("/chat", "m", "m", "499", ""): 1}


@pytest.mark.parametrize("stream", [False, True])
async def test_server_cancelling_a_left_request_cancels_the_model_call(stream: bool) -> None:
    """Serve's HTTP servers cancel a request's task when its client leaves,
    before the app sees ``http.disconnect``: the model's work must stop too."""
    handle = FakeHandle(unary=b"{}", delay=5) if not stream else FakeHandle(stream=[sse.DONE], head_delay=5)
    app = make_app(handle)
    body = [{"type": "http.request", "body": json.dumps({"model": "m", "stream": stream}).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if body:
            return body.pop(0)
        await asyncio.Event().wait()  # no disconnect message ever comes
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        pass

    serving = asyncio.ensure_future(app(dict(SCOPE), receive, send))
    while not handle.responses:
        await asyncio.sleep(0.01)
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    await model_work_stops(handle)
    assert app.state.metrics.snapshot()["llm_gateway_requests_total"] == {("/chat", "m", "m", "499", ""): 1}


@pytest.mark.parametrize("leaves", [False, True], ids=["read-whole", "client-left"])
async def test_a_background_streams_tokens_are_counted_once_whether_or_not_its_client_stays(leaves: bool) -> None:
    """A background response generates to its end either way; its tokens
    were missing from the metrics when its client left mid-stream."""
    from gateway.protocol.engine import Outcome

    outcome = Outcome(prompt_tokens=3, completion_tokens=5)
    handle = FakeHandle(stream=[sse.frame({"n": 0}), 0.3 if leaves else 0.0, sse.frame({"n": 1}), sse.DONE, outcome])
    app = make_app(handle)
    body = json.dumps({"model": "m", "input": "Hi", "stream": True, "background": True}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        if not leaves:
            await asyncio.Event().wait()
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {**SCOPE, "path": "/responses", "raw_path": b"/responses"}
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    assert sent[0]["status"] == 200, sent
    metrics = app.state.metrics
    replicas = app.state.dispatcher._table.model("m").client.relay
    if leaves:
        assert sum(replicas._open.values()) == 1  # its replica generates on: the relay balances by it

    def tokens() -> dict[Any, float]:
        return dict(metrics.snapshot().get("llm_gateway_tokens_total", {}))

    deadline = asyncio.get_running_loop().time() + 3
    while sum(tokens().values()) < 8:
        assert asyncio.get_running_loop().time() < deadline, metrics.snapshot()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # (nothing counts it again)
    assert sorted(tokens().values()) == [3, 5]
    assert sum(replicas._open.values()) == 0
    status = "499" if leaves else "200"
    assert metrics.snapshot()["llm_gateway_requests_total"] == {("/responses", "m", "m", status, ""): 1}


async def test_a_background_stream_is_read_to_its_end_past_the_models_request_timeout() -> None:
    # request_timeout_s does not bound a background response: its stream was
    # cut with a request_timeout error saying it was stopped, while it generated on.
    handle = FakeHandle(stream=[sse.frame({"n": 0}), 0.3, sse.frame({"n": 1}), sse.DONE])
    app = make_app(handle, timeouts={"m": 0.1})
    body = json.dumps({"model": "m", "input": "Hi", "stream": True, "background": True}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {**SCOPE, "path": "/responses", "raw_path": b"/responses"}
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    received = b"".join(message.get("body", b"") for message in sent[1:])
    assert sent[0]["status"] == 200 and b"request_timeout" not in received
    assert sse.frame({"n": 1}) in received
