"""models/llm/message_checks.py: chat messages vLLM's catch-all shape would take."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequestError
from models.llm.message_checks import check_chat_messages

HELLO = {"role": "user", "content": "Hello"}


@pytest.mark.parametrize(
    ("messages", "param", "code"),
    [
        ([{"role": "user", "contnet": "Hello"}], "messages[0].contnet", None),
        ([HELLO, {"role": "assistant", "content": "Hi", "tool_cals": []}], "messages[1].tool_cals", None),
        ([{"role": "user"}], "messages[0].content", "missing_required_parameter"),
        ([{"role": "system", "content": None}, HELLO], "messages[0].content", "missing_required_parameter"),
        ([HELLO, {"role": "tool", "tool_call_id": "c1"}], "messages[1].content", "missing_required_parameter"),
    ],
)
def test_a_key_no_message_has_or_a_turn_without_its_content_is_refused_naming_its_place(
    messages: list[dict[str, Any]], param: str, code: str | None
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_chat_messages({"messages": messages})
    assert (refused.value.param, refused.value.code) == (param, code)
    assert param in refused.value.message


@pytest.mark.parametrize(
    ("message", "param"),
    [
        # vLLM renders only tool_calls: the call vanished, its result answered nothing.
        ({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
         "messages[1].function_call"),
        # vLLM reads every image whole: a low-detail image was billed and seen at full size.
        ({"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                      {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}}]},
         "messages[1].content[1].image_url.detail"),
    ],
    ids=["function_call", "image-detail"],
)
def test_what_vllm_would_ignore_in_a_message_is_refused_naming_its_place(message: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_chat_messages({"messages": [HELLO, message]})
    assert (refused.value.param, refused.value.code) == (param, "unsupported_parameter")
    assert refused.value.message.startswith(f"Unsupported parameter: '{param}'")
    for detail in ("auto", "high"):  # what vLLM does: the image whole
        image = {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": detail}}
        check_chat_messages({"messages": [HELLO, {"role": "user", "content": [image]}]})


def test_answers_sent_back_tool_calls_and_a_templates_own_roles_pass() -> None:
    check_chat_messages({"messages": [
        HELLO,
        {"role": "assistant", "content": None, "refusal": None, "annotations": None, "audio": None,
         "function_call": None, "reasoning": "thought", "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "ipython", "content": "out"},  # vLLM keeps roles a template knows
        {"role": "developer", "content": "Be brief.", "tools": []},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Hi"}]},
    ]})  # fmt: skip


def test_what_is_no_list_of_messages_is_left_to_vllms_schema() -> None:
    check_chat_messages({"messages": "Hello"})
    check_chat_messages({"messages": ["Hello", 3]})
    check_chat_messages({"prompt": "Hello"})
