"""The echo engine's Anthropic Messages API, checked against the official SDK's own types."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter

from gateway.config import EchoModelConfig
from gateway.errors import ContextLengthExceededError, InvalidRequestError
from gateway.protocol.engine import EngineRequest
from models.llm.echo import EchoEngine
from models.llm.tally import GenerationTally

EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
CONVERSATION = [
    {"role": "user", "content": "the harbour at dawn"},
    {"role": "assistant", "content": "the harbour"},
    {"role": "user", "content": [{"type": "text", "text": "and the boats"}]},
]


@pytest.fixture
def engine() -> EchoEngine:
    return EchoEngine(EchoModelConfig(name="echo", max_model_len=64))


def ask(endpoint: str = "messages", **body: Any) -> EngineRequest:
    fields = {"model": "echo", "messages": CONVERSATION, "max_tokens": 16, **body}
    return EngineRequest(endpoint, fields, "r1", "echo")  # type: ignore[arg-type]


async def test_a_message_answers_the_last_user_turn_with_usage(engine: EchoEngine) -> None:
    tally = GenerationTally()
    body = await engine.complete(ask(system="be brief"), tally)
    assert isinstance(body, bytes)
    message = Message.model_validate(json.loads(body))
    assert (message.id, message.model, message.stop_reason) == ("msg_r1", "echo", "end_turn")
    assert [block.text for block in message.content if block.type == "text"] == ["and the boats"]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2 + 4 + 2 + 3, 3)
    assert (tally.prompt_tokens, tally.completion_tokens) == (11, 3)
    short = Message.model_validate(json.loads(await engine.complete(ask(max_tokens=2), GenerationTally())))  # type: ignore[arg-type]
    assert (short.stop_reason, short.usage.output_tokens) == ("max_tokens", 2)


async def test_a_stop_sequence_that_ends_the_answer_is_named_as_anthropic_names_it(engine: EchoEngine) -> None:
    # It was end_turn with stop_sequence null, where vLLM's models say stop_sequence and which.
    stopped = json.loads(await engine.complete(ask(stop_sequences=["zzz", "boats"]), GenerationTally()))  # type: ignore[arg-type]
    message = Message.model_validate(stopped)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "boats")
    assert [block.text for block in message.content if block.type == "text"] == ["and the"]
    stream = await engine.stream(ask(stream=True, stop_sequences=["boats"]), GenerationTally())
    assert isinstance(stream, AsyncIterator)
    blocks = b"".join([event async for event in stream]).decode().strip().split("\n\n")
    events = [EVENTS.validate_python(json.loads(block.split("\n")[1].removeprefix("data: "))) for block in blocks]
    assert events[0].message.stop_sequence is None  # (not yet known as the message starts)
    assert (events[-2].delta.stop_reason, events[-2].delta.stop_sequence) == ("stop_sequence", "boats")


async def test_a_stream_sends_anthropics_events_in_order(engine: EchoEngine) -> None:
    stream = await engine.stream(ask(stream=True), GenerationTally())
    assert isinstance(stream, AsyncIterator)
    events = []
    for block in b"".join([event async for event in stream]).decode().strip().split("\n\n"):
        kind_line, data_line = block.split("\n")
        event = EVENTS.validate_python(json.loads(data_line.removeprefix("data: ")))
        assert kind_line == f"event: {event.type}"
        events.append(event)
    kinds = [event.type for event in events]
    assert kinds == ["message_start", "content_block_start"] + ["content_block_delta"] * 3 + [
        "content_block_stop", "message_delta", "message_stop"
    ]
    assert "".join(event.delta.text for event in events if event.type == "content_block_delta") == "and the boats"
    assert events[-2].usage.output_tokens == 3 and events[-2].delta.stop_reason == "end_turn"


async def test_tokens_are_counted_and_mistakes_refused(engine: EchoEngine) -> None:
    counted = await engine.complete(ask("messages_count", max_tokens=None), GenerationTally())
    assert isinstance(counted, bytes) and MessageTokensCount.model_validate(json.loads(counted)).input_tokens == 9
    assert await engine.most_tokens(ask()) == 9 + 3
    with pytest.raises(InvalidRequestError) as caught:
        await engine.complete(ask(max_tokens=None), GenerationTally())
    assert caught.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceededError):
        await engine.complete(ask(max_tokens=60), GenerationTally())
    spaced = [*CONVERSATION, {"role": "assistant", "content": "Sure, "}]
    for endpoint in ("messages", "messages_count"):  # counted as it would be generated: not at all
        with pytest.raises(InvalidRequestError, match="trailing whitespace"):
            await engine.complete(ask(endpoint, messages=spaced), GenerationTally())


async def test_a_message_stream_left_early_counts_the_tokens_it_sent(engine: EchoEngine) -> None:
    tally = GenerationTally()
    stream = await engine.stream(ask(stream=True), tally)
    deltas = 0
    while deltas < 3:
        deltas += (await anext(stream)).startswith(b"event: content_block_delta\n")
    await stream.aclose()  # type: ignore[attr-defined]
    assert tally.outcome().completion_tokens == 3


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("messages", {"temperature": 1.5}, "temperature"),  # Anthropic's range is 0 to 1
        ("messages", {"stop_sequences": ["the", ""]}, "stop_sequences[1]"),
    ],
)
async def test_a_request_is_checked_as_the_vllm_engine_checks_it(
    engine: EchoEngine, endpoint: str, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        await engine.complete(ask(endpoint, **body), GenerationTally())
    assert refused.value.param == param
    assert await engine.most_tokens(ask(temperature=1.0)) > 0
