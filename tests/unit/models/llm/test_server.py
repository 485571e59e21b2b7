"""models/llm/server.py: streams count themselves and report their outcome; answers carry outcomes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from gateway import sse
from gateway.config import EchoModelConfig
from gateway.errors import ServiceUnavailableError
from gateway.protocol.engine import EngineRequest
from gateway.protocol.relay import RelayAddress
from models.llm.server import LLMServer
from models.llm.tally import GenerationTally


async def make_server(**config: object) -> LLMServer:
    server = LLMServer.__new__(LLMServer)
    config_ = EchoModelConfig(name="echo", **config)
    await server.__init__(config_, relay_host="127.0.0.1")  # type: ignore[misc]
    return server


async def test_stream_counts_itself_while_open_and_releases_on_close() -> None:
    server = await make_server()
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    frames, _ = await server.open_stream(EngineRequest("chat", body, "r1"))
    first = await anext(frames)
    assert sse.parse(first)[0]["choices"][0]["delta"]["role"] == "assistant"
    assert server.stats() == {"requests": 1, "active_streams": 1, "stored_responses": 0, "frozen_objects": 0}
    await frames.aclose()  # type: ignore[attr-defined]
    assert server.stats() == {"requests": 1, "active_streams": 0, "stored_responses": 0, "frozen_objects": 0}


async def test_a_streams_outcome_is_the_usage_it_reported() -> None:
    server = await make_server(echo_token_delay_ms=1)
    body = {
        "model": "echo",
        "messages": [{"role": "user", "content": "a b c d e f"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    frames, outcome = await server.open_stream(EngineRequest("chat", body, "r1"))
    payloads = sse.parse(b"".join([frame async for frame in frames]))
    usage = next(p["usage"] for p in payloads if p and p.get("usage"))
    counted = outcome()
    assert (counted.prompt_tokens, counted.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert sum(counted.inter_token_counts) == usage["completion_tokens"] - 1


async def test_the_replica_publishes_where_it_takes_streams() -> None:
    server = await make_server()
    address = RelayAddress.from_metadata(server.record_replica_metadata())
    assert address is not None and address.host == "127.0.0.1" and address.port > 0
    assert len(address.token) >= 32
    await server.stop()


async def test_a_body_comes_with_its_outcome() -> None:
    server = await make_server()
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 2}
    reply = await server.generate(EngineRequest("chat", body, "r1"))
    usage = json.loads(reply.body)["usage"]
    assert reply.outcome.completion_tokens == usage["completion_tokens"] == 2
    assert reply.outcome.prompt_tokens == usage["prompt_tokens"]


async def test_a_dead_engine_is_answered_503_then_the_replica_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.errors import ServiceUnavailableError
    from models.llm import server as server_module
    from models.llm.echo import EchoEngine

    monkeypatch.setattr(server_module, "WATCH_S", 0.01)
    monkeypatch.setattr(server_module, "DEAD_GRACE_S", 1.0)
    engine = EchoEngine(EchoModelConfig(name="echo"))
    exited = asyncio.Event()
    server = LLMServer.__new__(LLMServer)
    config = EchoModelConfig(name="echo")
    await server.__init__(config, engine=engine, relay_host="127.0.0.1", exit_process=exited.set)  # type: ignore[misc]
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 2}
    await server.generate(EngineRequest("chat", body, "r1"))
    await server.check_health()

    monkeypatch.setattr(engine, "dead", lambda: True)  # as vLLM's monitor marks it
    for _ in range(100):  # noticed within a few looks
        try:
            await server.check_health()
        except ServiceUnavailableError:
            break
        await asyncio.sleep(0.01)
    for call in (server.generate(EngineRequest("chat", body, "r2")), server.open_stream(EngineRequest("chat", body, "r3")), server.check_health()):
        with pytest.raises(ServiceUnavailableError) as caught:
            await call
        assert caught.value.status_code == 503 and caught.value.retry_after_s
    assert not exited.is_set()  # requests in flight get their errors first
    await asyncio.wait_for(exited.wait(), 5.0)
    await server.stop()


@pytest.mark.parametrize("at_start", [True, False])
async def test_an_adapter_that_cannot_load_fails_neither_the_start_nor_a_running_replica(at_start: bool) -> None:
    # Failing the start failed every replica started later while the adapter stayed in the config
    # (a scale-up, one replacing a dead engine): the model lost them all for one adapter.
    server = await make_server()  # the echo engine loads no adapter: it stands for one vLLM refuses
    if not at_start:
        await server.reconfigure({"lora_adapters": {}})
    await server.reconfigure({"lora_adapters": {"tuned": "/adapters/tuned"}})
    tuned = {"model": "tuned", "messages": [{"role": "user", "content": "a"}]}
    for call in (server.generate, server.open_stream, server.most_tokens):
        with pytest.raises(ServiceUnavailableError, match="serves no LoRA adapters"):
            await call(EngineRequest("chat", tuned, "r", "tuned"))
    reply = await server.generate(EngineRequest("chat", {**tuned, "model": "echo"}, "r", "echo"))
    assert json.loads(reply.body)["choices"]
    await server.stop()


async def test_an_adapter_the_replica_does_not_serve_is_answered_503_for_another_replica_to_answer() -> None:
    """A deploy restarts a model without an adapter the ingress still routes
    to (or adds one not loaded here yet): not vLLM's 404, which no client or
    fallback retries."""
    server = await make_server()
    tuned = {"model": "tuned", "messages": [{"role": "user", "content": "a"}]}
    for call in (server.generate, server.open_stream, server.most_tokens):
        with pytest.raises(ServiceUnavailableError, match="does not serve 'tuned' now"):
            await call(EngineRequest("chat", tuned, "r", "tuned"))
    await server.reconfigure({"lora_adapters": {}})
    with pytest.raises(ServiceUnavailableError, match="does not serve 'tuned' now"):
        await server.generate(EngineRequest("chat", tuned, "r", "tuned"))
    assert (await server.generate(EngineRequest("chat", {**tuned, "model": "echo"}, "r", "echo"))).body
    await server.stop()


async def test_a_response_stream_left_before_its_end_keeps_no_place() -> None:
    # Not in the background, the engine does not store it: kept here, it would take a place for nothing.
    server = await make_server(stored_responses=5, echo_token_delay_ms=1)
    streamed = {"model": "echo", "input": "a b c d e f g h", "stream": True}
    frames, _ = await server.open_stream(EngineRequest("responses", streamed, "left"))
    await anext(frames)
    await frames.aclose()  # type: ignore[attr-defined]  # its client left
    assert len(server._stored) == 0
    await server.stop()


async def test_a_response_stream_that_fails_after_its_first_event_keeps_no_place() -> None:
    # vLLM ends such a stream with its error event and stores nothing: kept
    # here, the id took a place, and a follow-up got 404 instead of OpenAI's 400.
    server = await make_server(stored_responses=5, echo_token_delay_ms=1)
    streamed = {"model": "echo", "input": "a b", "stream": True}
    frames, _ = await server.open_stream(EngineRequest("responses", streamed, "whole"))
    assert b"response.completed" in b"".join([frame async for frame in frames])
    assert len(server._stored) == 1

    async def failing(request: EngineRequest, tally: GenerationTally) -> AsyncIterator[bytes]:
        async def frames() -> AsyncIterator[bytes]:
            yield b"event: response.created\ndata: {}\n\n"
            tally.failed("internal_error", 500)
            yield b"event: error\ndata: {}\n\n"

        return frames()

    server._engine.stream = failing  # type: ignore[method-assign]
    frames, _ = await server.open_stream(EngineRequest("responses", streamed, "failed"))
    assert b"event: error" in b"".join([frame async for frame in frames])
    assert len(server._stored) == 1
    await server.stop()


async def test_past_the_bound_the_engine_keeps_the_responses_stored_last() -> None:
    """The engine stores a streamed response at its end: a response still
    streaming is never the one dropped, and once it ends the oldest stored
    goes, from the engine's store too."""
    server = await make_server(stored_responses=1, echo_token_delay_ms=1)
    streamed = {"model": "echo", "input": "a b c d e f g h", "stream": True}
    frames, _ = await server.open_stream(EngineRequest("responses", streamed, "first"))
    await anext(frames)
    await server.generate(EngineRequest("responses", {"model": "echo", "input": "x"}, "second"))
    kept = server._engine._stored  # type: ignore[attr-defined]  # (the echo engine's own store)
    assert [key.endswith("second") for key in kept] == [True]  # "first" still streams: nothing dropped
    async for _ in frames:
        pass
    assert [key.endswith("first") for key in kept] == [True]
    await server.stop()


async def test_a_replica_whose_engine_failed_to_start_still_stops_it() -> None:
    """Serve stops a replica whose constructor raised: the stop raised in turn
    (no relay yet), logged as an error beside the real one, and never shut the
    engine down."""

    class FailsToStart:
        shut = False

        def forget_response(self, response_id: str) -> None:
            pass

        async def start(self) -> None:
            raise TypeError("--tool-call-parser llama3_json cannot be used with the tokenizer of 'm'")

        async def shutdown(self) -> None:
            self.shut = True

    engine = FailsToStart()
    server = LLMServer.__new__(LLMServer)
    with pytest.raises(TypeError, match="tool-call-parser"):
        await server.__init__(EchoModelConfig(name="echo"), engine=engine, relay_host="127.0.0.1")  # type: ignore[misc, arg-type]
    await server.__del__()  # as Serve stops it
    assert engine.shut


async def test_an_adapter_leaving_is_refused_with_a_503_while_vllm_unloads_it() -> None:
    # Admitted meanwhile, its request got vLLM's 404 `model_not_found`, which nothing retries.
    server = await make_server()
    unloading, unloaded = asyncio.Event(), asyncio.Event()

    async def set_adapters(adapters: dict[str, str]) -> dict[str, str]:
        if not adapters:
            unloading.set()
            await unloaded.wait()
        return {}

    server._engine.set_adapters = set_adapters  # type: ignore[method-assign]  # (the echo engine loads none)
    await server.reconfigure({"lora_adapters": {"tuned": "/adapters/tuned"}})
    tuned = {"model": "tuned", "messages": [{"role": "user", "content": "a"}]}
    assert (await server.generate(EngineRequest("chat", tuned, "r", "tuned"))).body  # served
    change = asyncio.ensure_future(server.reconfigure({"lora_adapters": {}}))
    await unloading.wait()
    with pytest.raises(ServiceUnavailableError, match="does not serve 'tuned' now"):
        await server.generate(EngineRequest("chat", tuned, "r", "tuned"))
    unloaded.set()
    await change
    await server.stop()


async def test_the_time_to_first_token_counts_from_the_requests_arrival_at_the_replica() -> None:
    # Its wait for a place in the replica's queue included, as the metric says.
    server = await make_server()
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 2}
    arrived = time.time() - 0.5
    frames, outcome = await server.open_stream(EngineRequest("chat", {**body, "stream": True}, "r1", arrived=arrived))
    [_ async for _ in frames]
    reply = await server.generate(EngineRequest("chat", body, "r2", arrived=arrived))
    for first_token_s in (outcome().first_token_s, reply.outcome.first_token_s):
        assert first_token_s is not None and 0.5 <= first_token_s < 5


async def test_a_request_that_comes_as_the_engine_dies_is_refused_as_one_another_replica_may_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before the watch sees it (every 0.2 s): a request queued here takes a place the engine's
    # failed ones freed; it must be told the engine was already gone (ENGINE_DEAD, tried elsewhere),
    # not that the engine stopped under it (ENGINE_DIED, tried nowhere else).
    from gateway.errors import ENGINE_DEAD
    from models.llm import server as server_module
    from models.llm.echo import EchoEngine

    monkeypatch.setattr(server_module, "WATCH_S", 60.0)  # the watch has not looked yet
    engine = EchoEngine(EchoModelConfig(name="echo"))
    server = LLMServer.__new__(LLMServer)
    await server.__init__(EchoModelConfig(name="echo"), engine=engine, relay_host="127.0.0.1")  # type: ignore[misc]
    monkeypatch.setattr(engine, "dead", lambda: True)
    body = {"model": "echo", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 2}
    calls = (server.generate(EngineRequest("chat", body, "r1")), server.open_stream(EngineRequest("chat", body, "r2")))
    for call in calls:
        with pytest.raises(ServiceUnavailableError) as caught:
            await call
        assert caught.value.message == ENGINE_DEAD
    await server.stop()
