"""models/llm/server.py: the replica's stream hold follows its load; answers carry outcomes."""

from __future__ import annotations

import json

import pytest

from gateway import sse
from gateway.config import ModelConfig
from gateway.protocol.engine import EngineRequest, Reply
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
    data = first.body if isinstance(first, Reply) else first
    assert sse.parse(data)[0]["choices"][0]["delta"]["role"] == "assistant"
    assert server._active_streams == 1
    await stream.aclose()
    assert server._active_streams == 0


async def test_a_stream_ends_with_one_reply_carrying_the_usage_it_reported() -> None:
    server = await make_server(echo_token_delay_ms=1)
    body = {
        "model": "echo",
        "messages": [{"role": "user", "content": "a b c d e f"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    items = [item async for item in server.generate_stream(EngineRequest("chat", body, "r1"))]
    assert all(isinstance(item, bytes) for item in items[:-1]) and isinstance(items[-1], Reply)
    frames = sse.parse(b"".join(i.body if isinstance(i, Reply) else i for i in items))
    usage = next(f["usage"] for f in frames if f.get("usage"))
    outcome = items[-1].outcome
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])


async def test_a_body_comes_with_its_outcome() -> None:
    server = await make_server()
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 2}
    reply = await server.generate(EngineRequest("chat", body, "r1"))
    usage = json.loads(reply.body)["usage"]
    assert reply.outcome.completion_tokens == usage["completion_tokens"] == 2
    assert reply.outcome.prompt_tokens == usage["prompt_tokens"]
