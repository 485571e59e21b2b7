"""models/llm/server.py: the replica's stream hold follows its load."""

from __future__ import annotations

import pytest

from gateway.config import ModelConfig
from gateway.protocol.engine import EngineRequest
from gateway import sse
from models.llm.server import LLMServer


async def make_server(**config: object) -> LLMServer:
    server = LLMServer.__new__(LLMServer)
    await server.__init__(ModelConfig(name="echo", engine="echo", **config))  # type: ignore[misc]
    return server


@pytest.mark.parametrize(
    ("active", "expected_ms"),
    [(0, 0.0), (1, 2.5), (8, 20.0), (32, 80.0), (200, 100.0)],
)
async def test_hold_grows_with_active_streams_up_to_the_cap(active: int, expected_ms: float) -> None:
    server = await make_server(stream_messages_per_s=400, stream_max_hold_ms=100)
    server._active_streams = active
    assert server._hold_s() * 1000 == pytest.approx(expected_ms)


async def test_zero_cap_never_holds() -> None:
    server = await make_server(stream_max_hold_ms=0)
    server._active_streams = 50
    assert server._hold_s() == 0


async def test_stream_counts_itself_while_open_and_releases_on_close() -> None:
    server = await make_server()
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    stream = server.generate_stream(EngineRequest("chat", body, "r1"))
    first = await anext(stream)
    assert sse.parse(first)[0]["choices"][0]["delta"]["role"] == "assistant"
    assert server._active_streams == 1
    await stream.aclose()
    assert server._active_streams == 0
