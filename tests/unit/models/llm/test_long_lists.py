"""models/llm/long_lists.py: a body's long lists validated a part at a time,
against vLLM's own chat schema and the engine's validation (no model is
started here)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.errors import InvalidRequestError
from models.llm import long_lists, vllm_errors
from tests.unit.loop_ticks import ticking

pytestmark = pytest.mark.filterwarnings("ignore:max_tokens is deprecated:DeprecationWarning")

WRONG = {"role": "user", "content": 5}  # fails each of the seven message shapes


def _schema() -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest


def _validate(body: dict[str, Any]) -> Any:
    return vllm_errors.validated(_schema(), body)


def _messages(count: int, wrong_at: int | None = None) -> list[dict[str, Any]]:
    messages = [{"role": "user", "content": "hi"}] * count
    if wrong_at is not None:
        messages[wrong_at] = WRONG
    return messages


def _whole_refusal(body: dict[str, Any]) -> InvalidRequestError:
    """The refusal of ``body`` validated in one call, as the engine words it."""
    try:
        _validate(body)
    except ValidationError as exc:
        return InvalidRequestError.from_validation(exc)
    except InvalidRequestError as exc:
        return exc
    raise AssertionError("the body was taken")


def _screened(body: dict[str, Any], validate: Any = _validate) -> InvalidRequestError | None:
    try:
        asyncio.run(long_lists.screen(validate, body))
    except InvalidRequestError as exc:
        return exc
    return None


def _same(found: InvalidRequestError | None, wanted: InvalidRequestError) -> None:
    assert found is not None
    assert (found.message, found.param, found.code, found.status_code) == (
        wanted.message,
        wanted.param,
        wanted.code,
        wanted.status_code,
    )


def test_a_wrong_message_in_a_later_part_is_named_where_it_is_in_the_whole_body() -> None:
    body = {"model": "m", "messages": _messages(1000, wrong_at=700)}
    found = _screened(body)
    _same(found, _whole_refusal(body))
    assert found is not None and found.param == "messages[700].content"


def test_a_wrong_content_part_of_a_long_message_is_named_in_its_message() -> None:
    parts: list[Any] = [{"type": "text", "text": "a"}] * 300
    parts[200] = 5
    body = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": parts}]}
    found = _screened(body)
    _same(found, _whole_refusal(body))
    assert found is not None and found.param == "messages[1].content[200]"


def test_a_body_of_wrong_messages_is_refused_from_its_first_part_alone() -> None:
    seen: list[int] = []

    def validate(body: dict[str, Any]) -> Any:
        seen.append(len(body["messages"]))
        return _validate(body)

    found = _screened({"model": "m", "messages": _messages(20_000, wrong_at=0)}, validate)
    assert found is not None and found.param == "messages[0].content"
    assert seen == [long_lists.PART]  # never the 20,000 messages in one call


def test_other_coroutines_run_between_the_parts() -> None:
    async def screened_with_a_ticker() -> int:
        async with ticking() as ticks:
            with pytest.raises(InvalidRequestError):
                await long_lists.screen(_validate, {"model": "m", "messages": _messages(1000, wrong_at=999)})
        return ticks.count

    assert asyncio.run(screened_with_a_ticker()) >= 1000 // long_lists.PART


def test_right_lists_and_mistakes_outside_them_are_left_to_the_whole_body() -> None:
    assert _screened({"model": "m", "messages": _messages(1000)}) is None
    # A wrong field outside the lists is the whole body's to name (each part has it too).
    assert _screened({"model": "m", "messages": _messages(1000), "temperature": "hot"}) is None
    assert _screened({"model": "m", "messages": _messages(10, wrong_at=3)}) is None  # short: validated whole


def test_each_part_holds_every_other_long_list_cut_to_a_part() -> None:
    # Whole, the other list made the cost the product of the two: 16,000 messages and tools took 46 s.
    sizes: list[tuple[int, int]] = []

    def validate(body: dict[str, Any]) -> Any:
        sizes.append((len(body["messages"]), len(body["tools"])))
        return _validate(body)

    tools = [{"type": "function", "function": {"name": f"f{at}", "parameters": {"type": "object"}}} for at in range(1000)]
    body = {"model": "m", "messages": _messages(1000), "tools": tools, "tool_choice": "none"}
    assert _screened(body, validate) is None
    assert len(sizes) == 2 * 8  # every part of each list
    assert max(max(pair) for pair in sizes) == long_lists.PART
