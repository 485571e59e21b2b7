"""models/llm/vllm_truncation.py: ``truncation: "auto"`` drops the oldest items, the fewest that make it fit."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from models.llm import vllm_truncation


class Renderer:
    """vLLM's ``render_responses`` as far as truncation sees it: the prompt is
    every message's words (an engine input of that many tokens)."""

    def __init__(self) -> None:
        self.renders = 0

    async def render_responses(self, request: Any, **kwargs: Any) -> Any:
        self.renders += 1
        messages = [*(kwargs["previous_messages"] or ()), *(kwargs["previous_response_outputs"] or ())]
        items = [request.input] if isinstance(request.input, str) else request.input
        conversation = [*messages, *items]
        words = sum(len(str(_text(m)).split()) for m in conversation)
        return SimpleNamespace(engine_input=words, messages=conversation)


def _text(message: Any) -> Any:
    return message if isinstance(message, str) else message.get("content", message.get("output", ""))


class Request(SimpleNamespace):
    def model_copy(self, update: dict[str, Any]) -> Request:
        return Request(**{**vars(self), **update})


def responses(stored: dict[str, list[Any]] | None = None) -> Any:
    return SimpleNamespace(msg_store=stored or {}, online_renderer=Renderer(), tool_server=None)


def words(n: int, word: str = "w") -> str:
    return " ".join([word] * n)


async def test_the_fewest_oldest_input_items_are_dropped() -> None:
    items = [{"role": "user", "content": words(50)}, {"role": "assistant", "content": words(5)},
             {"role": "user", "content": words(40)}, {"role": "user", "content": "last"}]
    result = await vllm_truncation.fitting(responses(), Request(input=items), None, lambda r: r.engine_input <= 50)
    assert result.messages == items[1:]  # 46 words: dropping one item is enough


async def test_the_previous_conversation_goes_first_then_its_answer() -> None:
    previous = SimpleNamespace(id="resp_1", output=[{"role": "assistant", "content": words(10)}])
    stored = {"resp_1": [{"role": "system", "content": "be brief"}, {"role": "user", "content": words(30)}]}
    request = Request(input=words(20))
    kept = await vllm_truncation.fitting(responses(stored), request, previous, lambda r: r.engine_input <= 30)
    assert kept.messages == [previous.output[0], words(20)]
    alone = await vllm_truncation.fitting(responses(stored), request, previous, lambda r: r.engine_input <= 20)
    assert alone.messages == [words(20)]  # the input stays a string


async def test_an_output_whose_call_was_dropped_goes_with_it() -> None:
    items = [{"type": "function_call", "call_id": "c", "name": "f", "arguments": words(30)},
             {"type": "function_call_output", "call_id": "c", "output": words(3)},
             {"role": "user", "content": words(10)}]
    result = await vllm_truncation.fitting(responses(), Request(input=items), None, lambda r: r.engine_input <= 20)
    assert result.messages == items[2:]


async def test_where_nothing_fits_the_last_item_alone_is_rendered_for_the_caller_to_refuse() -> None:
    items = [{"role": "user", "content": words(10)}, {"role": "user", "content": words(90)}]
    result = await vllm_truncation.fitting(responses(), Request(input=items), None, lambda r: r.engine_input <= 50)
    assert result.messages == items[1:]


@pytest.mark.parametrize("count", [8, 64, 512])
async def test_a_long_conversation_takes_a_logarithmic_number_of_renders(count: int) -> None:
    items = [{"role": "user", "content": words(10)} for _ in range(count)]
    vllm = responses()
    result = await vllm_truncation.fitting(vllm, Request(input=items), None, lambda r: r.engine_input <= 30)
    assert len(result.messages) == 3
    assert vllm.online_renderer.renders <= count.bit_length() + 1


async def test_an_error_from_vllms_renderer_is_returned_as_it_is() -> None:
    vllm = responses()
    refused = SimpleNamespace(error="bad")

    async def refuse(request: Any, **kwargs: Any) -> Any:
        return refused

    vllm.online_renderer.render_responses = refuse
    items = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert await vllm_truncation.fitting(vllm, Request(input=items), None, lambda r: False) is refused
