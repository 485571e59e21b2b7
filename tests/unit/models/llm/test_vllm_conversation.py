"""models/llm/vllm_conversation.py: a follow-up keeps the previous response's
tool calls; ``truncation: "auto"`` drops the fewest oldest items, cutting where a user turn begins."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from openai.types.responses import ResponseFunctionToolCall

from gateway.errors import InvalidRequestError
from models.llm import vllm_conversation


class TooLong(Exception):
    parameter = "input_tokens"  # as vLLM's VLLMValidationError for a prompt beyond the window


class Renderer:
    """vLLM's ``render_responses`` as far as the conversation goes: the prompt
    is every message's words (an engine input of that many tokens); with
    ``truncation`` other than disabled vLLM would cut it, so the tests see
    which a try asked for."""

    def __init__(self, window: int = 1000) -> None:
        self.renders: list[Any] = []
        self.window = window

    async def render_responses(self, request: Any, **kwargs: Any) -> Any:
        self.renders.append((request, kwargs))
        messages = [*(kwargs["previous_messages"] or ()), *(kwargs["previous_response_outputs"] or ())]
        items = [request.input] if isinstance(request.input, str) else request.input
        conversation = [*messages, *items]
        words = sum(len(str(_text(m)).split()) for m in conversation)
        if words > self.window and request.truncation == "disabled":
            raise TooLong("too long")
        return SimpleNamespace(engine_input=words, messages=conversation)


def _text(message: Any) -> Any:
    if isinstance(message, str):
        return message
    return message.get("content") or message.get("output") or message.get("arguments") or ""


class Request(SimpleNamespace):
    def model_copy(self, update: dict[str, Any]) -> Request:
        return Request(**{**vars(self), **update})


def responses(stored: dict[str, list[Any]] | None = None, window: int = 1000) -> Any:
    return SimpleNamespace(msg_store=stored or {}, online_renderer=Renderer(window), tool_server=None)


def words(n: int) -> str:
    return " ".join(["w"] * n)


def user(n: int) -> dict[str, str]:
    return {"role": "user", "content": words(n)}


async def render(vllm: Any, items: Any, fits: int, previous: Any = None, truncation: str = "auto") -> Any:
    request = Request(input=items, truncation=truncation)
    return await vllm_conversation.render(vllm, request, previous, lambda r: r.engine_input <= fits)


async def test_the_fewest_oldest_items_are_dropped_where_a_user_turn_begins_the_rest() -> None:
    items = [user(50), {"role": "assistant", "content": words(5)}, user(40), {"role": "user", "content": "last"}]
    result = await render(responses(), items, 50)
    assert result.messages == items[2:]  # not items[1:]: an assistant turn would begin the conversation


async def test_what_fits_whole_is_rendered_whole_with_vllms_truncation_off() -> None:
    vllm = responses()
    result = await render(vllm, [user(5), user(5)], 50)
    assert result.engine_input == 10 and len(vllm.online_renderer.renders) == 1
    assert vllm.online_renderer.renders[0][0].truncation == "disabled"


async def test_the_previous_conversation_goes_first_then_its_answer() -> None:
    previous = SimpleNamespace(id="resp_1", output=[{"type": "message", "role": "assistant", "content": words(10)}])
    stored = {"resp_1": [{"role": "system", "content": "be brief"}, user(30), {"role": "assistant", "content": "ok"},
                         user(5)]}
    kept = await render(responses(stored), words(20), 40, previous)
    assert kept.messages == [user(5), previous.output[0], words(20)]
    alone = await render(responses(stored), words(20), 20, previous)
    assert alone.messages == [words(20)]  # the input stays a string


async def test_an_output_never_loses_its_call() -> None:
    items = [{"type": "function_call", "call_id": "c", "name": "f", "arguments": words(30)},
             {"type": "function_call_output", "call_id": "c", "output": words(3)}, user(10)]
    result = await render(responses(), items, 20)
    assert result.messages == items[2:]


async def test_where_nothing_fits_the_shortest_cut_is_rendered_for_the_caller_to_refuse() -> None:
    items = [user(10), user(90)]
    result = await render(responses(), items, 50)
    assert result.messages == items[1:]


async def test_a_prompt_vllm_refuses_as_too_long_is_cut_and_another_failure_raised() -> None:
    result = await render(responses(window=60), [user(50), user(40), user(5)], 50)
    assert result.messages[-2:] == [user(40), user(5)]

    class Broken(Renderer):
        async def render_responses(self, request: Any, **kwargs: Any) -> Any:
            raise ValueError("a template error")

    vllm = responses()
    vllm.online_renderer = Broken()
    with pytest.raises(ValueError):
        await render(vllm, [user(5), user(5)], 50)


async def test_a_cut_vllm_refuses_is_passed_over() -> None:
    class Picky(Renderer):
        async def render_responses(self, request: Any, **kwargs: Any) -> Any:
            if len(request.input) == 2:  # say, a template that refuses this conversation's start
                raise ValueError("conversation roles must alternate")
            return await super().render_responses(request, **kwargs)

    vllm = responses()
    vllm.online_renderer = Picky()
    result = await render(vllm, [user(50), user(30), user(5)], 20)
    assert result.messages == [user(5)]


@pytest.mark.parametrize("count", [8, 64, 512])
async def test_a_long_conversation_takes_a_logarithmic_number_of_renders(count: int) -> None:
    vllm = responses()
    result = await render(vllm, [user(10) for _ in range(count)], 30)
    assert len(result.messages) == 3
    assert len(vllm.online_renderer.renders) <= count.bit_length() + 2


async def test_a_follow_up_keeps_the_previous_responses_tool_calls() -> None:
    call = ResponseFunctionToolCall(type="function_call", call_id="call_1", name="weather", arguments='{"c": "Oslo"}')
    previous = SimpleNamespace(id="resp_1", output=[call])
    stored = {"resp_1": [user(3)]}
    request = Request(input=[{"type": "function_call_output", "call_id": "call_1", "output": "22C"}],
                      truncation="disabled")
    assert vllm_conversation.takes_over(request, previous)
    assert not vllm_conversation.takes_over(request, SimpleNamespace(id="resp_2", output=[]))
    vllm = responses(stored)
    await vllm_conversation.render(vllm, request, previous, lambda r: True)
    sent, options = vllm.online_renderer.renders[0]
    assert sent.truncation == "disabled" and options["previous_response_outputs"] is None
    assert options["previous_messages"][0] == user(3)
    called = options["previous_messages"][1]
    assert called["role"] == "assistant" and called["tool_calls"][0]["id"] == "call_1"
    assert called["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"c": "Oslo"}'}


def _keeping(output: list[Any], messages: list[Any]) -> Any:
    return SimpleNamespace(
        response_store={"resp_1": SimpleNamespace(output=output)}, msg_store={"resp_1": messages}
    )


def test_a_call_output_needs_a_call_before_it() -> None:
    answered = {"type": "function_call_output", "call_id": "call_9", "output": "22C"}
    with pytest.raises(InvalidRequestError, match="call_id call_9") as refused:
        vllm_conversation.check_call_outputs(_keeping([], []), {"input": [user(2), answered]})
    assert refused.value.param == "input"
    call = {"type": "function_call", "call_id": "call_9", "name": "f", "arguments": "{}"}
    vllm_conversation.check_call_outputs(_keeping([], []), {"input": [call, answered]})
    with pytest.raises(InvalidRequestError):  # a call after its output answers nothing before it
        vllm_conversation.check_call_outputs(_keeping([], []), {"input": [answered, call]})


def test_a_call_in_the_previous_conversation_answers_for_an_output() -> None:
    answered = {"type": "function_call_output", "call_id": "call_9", "output": "22C"}
    body = {"input": [answered], "previous_response_id": "resp_1"}
    vllm_conversation.check_call_outputs(_keeping([SimpleNamespace(call_id="call_9")], []), body)
    earlier = [{"role": "assistant", "tool_calls": [{"id": "call_9", "type": "function"}]}]
    vllm_conversation.check_call_outputs(_keeping([], earlier), body)
    with pytest.raises(InvalidRequestError):
        vllm_conversation.check_call_outputs(_keeping([SimpleNamespace(call_id="call_1")], []), body)
