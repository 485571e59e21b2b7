"""models/llm/vllm_engine.py: the checks run on each rendered prompt, against
vLLM's own parsed requests (no model is started here)."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config import VLLMModelConfig
from gateway.errors import ContextLengthExceededError, InvalidRequestError
from models.llm.vllm_compat import Serving
from models.llm.vllm_engine import VLLMEngine

# The engine reads a chat request's max_tokens, which vLLM's schema marks deprecated as it is read.
pytestmark = pytest.mark.filterwarnings("ignore:max_tokens is deprecated:DeprecationWarning")


def _engine(max_model_len: int) -> VLLMEngine:
    engine = VLLMEngine(VLLMModelConfig(name="m", model="org/m"))
    model_config = SimpleNamespace(is_encoder_decoder=False)
    engine._serving = Serving(engine=None, model_config=model_config, max_model_len=max_model_len)
    return engine


def _prompt(tokens: int) -> dict[str, Any]:
    return {"type": "token", "prompt_token_ids": list(range(tokens))}


def _chat(**fields: Any) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_beyond_the_window_rest_is_refused_naming_it_without_max_tokens(stream: bool) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        _engine(2048)._check_rendered("chat", _chat(min_tokens=2040, stream=stream), [_prompt(14)])
    assert (caught.value.param, caught.value.status_code) == ("min_tokens", 400)
    assert caught.value.message.startswith(
        "Invalid 'min_tokens': integer above maximum value. Expected a value <= 2034, but got 2040 instead."
    )


def test_min_tokens_within_the_window_rest_passes() -> None:
    engine = _engine(2048)
    engine._check_rendered("chat", _chat(min_tokens=2034), [_prompt(14)])
    engine._check_rendered("chat", _chat(), [_prompt(2047)])


def test_a_prompt_filling_the_window_without_a_budget_is_context_length_exceeded() -> None:
    # vLLM refused it as "max_tokens must be at least 1, got 0.", naming a field not sent.
    with pytest.raises(ContextLengthExceededError) as caught:
        _engine(2048)._check_rendered("chat", _chat(), [_prompt(2048)])
    assert (caught.value.param, caught.value.code) == ("messages", "context_length_exceeded")


def test_a_budget_beyond_the_window_rest_is_refused_naming_the_prompt() -> None:
    with pytest.raises(ContextLengthExceededError) as caught:
        _engine(2048)._check_rendered("chat", _chat(max_tokens=2040), [_prompt(14)])
    assert caught.value.param == "messages"


def test_what_the_engine_used_for_a_request_sums_its_choices() -> None:
    # vLLM keeps a request's state per choice (n), under internal ids of its external one.
    from models.llm.vllm_engine import _used

    def state(generated: int) -> Any:
        return SimpleNamespace(prompt_len=10, detokenizer=SimpleNamespace(num_output_tokens=lambda: generated))

    processor = SimpleNamespace(
        external_req_ids={"req": ["req-a", "req-b"]}, request_states={"req-a": state(3), "req-b": state(4)}
    )
    engine = SimpleNamespace(output_processor=processor)
    assert _used(engine, "req") == (10, 7)
    assert _used(engine, "other") is None  # ended, or never added: known from its outputs
    assert _used(SimpleNamespace(), "req") is None  # another vLLM's internals
    # Non-streaming n > 1: a choice that ended has left the states; its output waits in its parent's aggregate.
    parent = SimpleNamespace(output_aggregator=[SimpleNamespace(token_ids=[1] * 5), None, None])
    for name in ("req-a", "req-b"):
        processor.request_states[name].parent_req = parent
    assert _used(engine, "req") == (10, 12)


def test_a_long_wrong_body_is_validated_with_the_replica_loop_running() -> None:
    # Validated whole, 1,000 messages with a wrong one hold the loop (and every stream on it) throughout.
    import asyncio

    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from gateway.protocol.engine import EngineRequest
    from tests.unit.loop_ticks import ticking

    async def never_called(parsed: Any, create: Any) -> Any:
        raise AssertionError("a wrong body reached vLLM")

    engine = _engine(2048)
    engine._vllm.endpoints["chat"] = (ChatCompletionRequest, never_called, "messages")
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi"}] * 1000
    messages[900] = {"role": "user", "content": 5}
    request = EngineRequest(endpoint="chat", body={"model": "m", "messages": messages}, request_id="r", model="m")

    async def served_with_a_ticker() -> tuple[int, InvalidRequestError]:
        async with ticking() as ticks:
            with pytest.raises(InvalidRequestError) as caught:
                await engine._served(request, never_called)
        return ticks.count, caught.value

    ticks, refusal = asyncio.run(served_with_a_ticker())
    assert refusal.param == "messages[900].content"
    assert ticks >= 1  # the loop ran while the parts before the wrong one were validated


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"name": ["a"], "input_schema": {}}]}, "tools[0].name"),
        (
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": [{"type": "tool_use", "id": {"x": 1}, "name": "f", "input": {}}]}]},
            "messages[1].content[0].id",
        ),
    ],
    ids=["tool-name-list", "tool-use-id-object"],
)
def test_a_wrong_json_type_the_body_checks_trip_on_is_named_by_vllms_schema(body: dict[str, Any], param: str) -> None:
    # The gateway's own checks, which run before vLLM's schema, failed on it with a 500.
    import asyncio

    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest

    from gateway.protocol.engine import EngineRequest

    async def never_called(parsed: Any, create: Any) -> Any:
        raise AssertionError("a wrong body reached vLLM")

    engine = _engine(2048)
    engine._vllm.endpoints["messages"] = (AnthropicMessagesRequest, never_called, "messages")
    sent = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(engine._served(EngineRequest(endpoint="messages", body=sent, request_id="r", model="m"), never_called))
    assert caught.value.param == param and caught.value.status_code == 400


def test_a_chats_null_tool_choice_reaches_vllm_as_not_set() -> None:
    # vLLM parsed a whole answer's calls out as for "auto", then answered with neither text nor calls.
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from gateway.protocol.engine import EngineRequest
    from models.llm.vllm_engine import _with_request_id

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "tools": tools, "tool_choice": None}
    sent = _with_request_id(EngineRequest("chat", body, "req-1", "m"))
    assert "tool_choice" not in sent and body["tool_choice"] is None  # (the client's body as it came)
    assert ChatCompletionRequest.model_validate(sent).tool_choice == "auto"  # OpenAI's default with tools


class _Started(Exception):
    pass


@pytest.mark.parametrize(("num_gpus", "visible"), [(0, ""), (1, "0,1")])
async def test_a_replica_given_no_gpu_hides_every_gpu_even_one_named_where_the_gateway_started(
    monkeypatch: pytest.MonkeyPatch, num_gpus: int, visible: str
) -> None:
    # `CUDA_VISIBLE_DEVICES=0,1 llm-gateway serve`: Ray leaves it alone for an actor given none, and
    # vLLM took GPU 0, which Ray had given another replica.
    from models.llm import vllm_compat

    async def build_serving(*_: Any) -> Any:
        raise _Started

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("VLLM_ENABLE_RESPONSES_API_STORE", raising=False)  # (put back as it was: start sets it)
    monkeypatch.setattr(vllm_compat, "build_serving", build_serving)
    with pytest.raises(_Started):
        await VLLMEngine(VLLMModelConfig(name="m", model="org/m", num_gpus=num_gpus)).start()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == visible
