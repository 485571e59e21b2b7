"""The echo engine's Responses API, checked against the official SDK's own types."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.config import EchoModelConfig
from gateway.errors import ContextLengthExceededError, InvalidRequestError, ResponseNotFoundError
from gateway.protocol.engine import EngineRequest
from models.llm.echo import EchoEngine
from models.llm.tally import GenerationTally

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


@pytest.fixture
def engine() -> EchoEngine:
    return EchoEngine(EchoModelConfig(name="echo", max_model_len=64))


def create(request_id: str = "r1", **body: Any) -> EngineRequest:
    return EngineRequest("responses", {"model": "echo", "input": "the harbour at dawn", **body}, request_id, "echo")


async def answer(engine: EchoEngine, request: EngineRequest, tally: GenerationTally | None = None) -> Response:
    body = await engine.complete(request, tally or GenerationTally())
    assert isinstance(body, bytes)
    return Response.model_validate(json.loads(body))


async def test_a_response_echoes_the_input_with_usage(engine: EchoEngine) -> None:
    tally = GenerationTally()
    response = await answer(engine, create(instructions="be brief"), tally)
    assert (response.id, response.status, response.model) == ("resp_r1", "completed", "echo")
    assert response.output_text == "the harbour at dawn"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (6, 4)  # instructions count
    assert (tally.prompt_tokens, tally.completion_tokens) == (6, 4)
    short = await answer(engine, create("r2", max_output_tokens=2))
    assert (short.status, short.output_text) == ("incomplete", "the harbour")
    assert short.incomplete_details is not None and short.incomplete_details.reason == "max_output_tokens"


async def test_a_stream_sends_openais_events_in_order(engine: EchoEngine) -> None:
    tally = GenerationTally()
    stream = await engine.stream(create(stream=True), tally)
    assert isinstance(stream, AsyncIterator)
    raw = b"".join([event async for event in stream])
    events = []
    for block in raw.decode().strip().split("\n\n"):
        kind_line, data_line = block.split("\n")
        event = EVENTS.validate_python(json.loads(data_line.removeprefix("data: ")))
        assert kind_line == f"event: {event.type}"
        events.append(event)
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == events[-1].response.output_text == "the harbour at dawn"
    assert (tally.prompt_tokens, tally.completion_tokens) == (4, 4) and tally.first_token_s is not None


async def test_a_follow_up_is_prompted_with_the_earlier_turns_and_can_be_retrieved(engine: EchoEngine) -> None:
    first = await answer(engine, create("r1"))
    second = await answer(engine, create("r2", input="and the boats", previous_response_id=first.id))
    assert second.output_text == "and the boats"
    assert second.previous_response_id == "resp_r1"
    assert second.usage is not None and second.usage.input_tokens == 4 + 4 + 3  # input, answer, new input
    kept = await engine.complete(EngineRequest("responses_retrieve", {"response_id": second.id}, "r3", "echo"), GenerationTally())
    assert isinstance(kept, bytes) and Response.model_validate(json.loads(kept)) == second
    with pytest.raises(InvalidRequestError, match="answered at once"):
        await engine.complete(EngineRequest("responses_cancel", {"response_id": second.id}, "r4", "echo"), GenerationTally())
    engine.forget_response(first.id)
    with pytest.raises(ResponseNotFoundError) as caught:
        await answer(engine, create("r5", previous_response_id=first.id))
    assert caught.value.param == "previous_response_id"


async def test_a_deleted_response_is_gone(engine: EchoEngine) -> None:
    response = await answer(engine, create("r1"))
    delete = EngineRequest("responses_delete", {"response_id": response.id}, "r2", "echo")
    body = await engine.complete(delete, GenerationTally())
    assert json.loads(body) == {"id": response.id, "object": "response", "deleted": True}
    for endpoint in ("responses_retrieve", "responses_delete"):
        with pytest.raises(ResponseNotFoundError) as caught:
            await engine.complete(EngineRequest(endpoint, {"response_id": response.id}, "r3", "echo"), GenerationTally())
        assert (caught.value.status_code, caught.value.param) == (404, "response_id")
    with pytest.raises(ResponseNotFoundError):
        await answer(engine, create("r4", previous_response_id=response.id))


async def test_an_unstored_response_is_not_kept_and_bad_requests_are_refused(engine: EchoEngine) -> None:
    response = await answer(engine, create(store=False))
    with pytest.raises(ResponseNotFoundError):
        await engine.complete(EngineRequest("responses_retrieve", {"response_id": response.id}, "r2", "echo"), GenerationTally())
    with pytest.raises(InvalidRequestError) as caught:
        await engine.complete(create(max_output_tokens=0), GenerationTally())
    assert caught.value.param == "max_output_tokens"
    with pytest.raises(ContextLengthExceededError):
        await engine.complete(create(input="word " * 70), GenerationTally())
    with pytest.raises(InvalidRequestError) as caught:  # no input is short enough for it
        await engine.complete(create(max_output_tokens=65), GenerationTally())
    assert (caught.value.param, caught.value.code) == ("max_output_tokens", "invalid_value")
    assert "at most 64 output tokens" in caught.value.message
    assert await engine.most_tokens(create(max_output_tokens=3)) == 4 + 3


async def test_input_tokens_are_what_the_response_would_be_billed(engine: EchoEngine) -> None:
    from openai.types.responses import InputTokenCountResponse

    async def count(**body: Any) -> int:
        request = EngineRequest("responses_input_tokens", {"model": "echo", **body}, "c", "echo")
        counted = InputTokenCountResponse.model_validate_json(await engine.complete(request, GenerationTally()))
        assert counted.object == "response.input_tokens"
        assert await engine.most_tokens(request) == 0  # counts, reserves nothing
        return counted.input_tokens

    first = await answer(engine, create("r1", instructions="be brief"))
    assert first.usage is not None
    assert await count(input="the harbour at dawn", instructions="be brief") == first.usage.input_tokens
    follow_up = await answer(engine, create("r2", input="and at dusk", previous_response_id="resp_r1"))
    assert follow_up.usage is not None
    # The earlier instructions are not carried on (as OpenAI and vLLM drop them): its
    # input and answer are, then the new input's three words.
    carried = first.usage.input_tokens - len("be brief".split()) + first.usage.output_tokens
    assert follow_up.usage.input_tokens == carried + 3
    assert await count(input="and at dusk", previous_response_id="resp_r1") == follow_up.usage.input_tokens
    with pytest.raises(ResponseNotFoundError):
        await count(input="hi", previous_response_id="resp_gone")
    with pytest.raises(InvalidRequestError) as refused:
        await count(input="hi", max_output_tokens=5)  # shapes only the answer: not counted, refused
    assert refused.value.param == "max_output_tokens"
    assert await count(input=[], instructions="be brief") == 2
    for endpoint in ("responses", "responses_input_tokens"):  # nothing to answer, as the vLLM engine says it
        with pytest.raises(InvalidRequestError) as refused:
            await engine.complete(EngineRequest(endpoint, {"model": "echo", "input": []}, "e", "echo"), GenerationTally())
        assert (refused.value.param, refused.value.code) == ("input", "empty_array")
