"""models/llm/prompt_checks.py: empty prompt arrays and ids outside the vocabulary, refused naming the field."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequestError
from models.llm.prompt_checks import (
    check_message_content,
    check_input,
    check_not_empty,
    check_prefill,
    check_prompt_ids,
    check_token_ids,
)


@pytest.mark.parametrize("tokens, param", [([5, 1024], "tokens[1]"), ([-1], "tokens[0]"), ([3, 2**62, -1], "tokens[1]")])
def test_an_id_past_the_vocabulary_is_refused_naming_its_place(tokens: list[int], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_token_ids(tokens, 1023)
    assert (caught.value.status_code, caught.value.param) == (400, param)
    assert "(0 to 1023)" in caught.value.message


def test_ids_in_the_vocabulary_pass_and_no_bound_checks_nothing() -> None:
    check_token_ids([0, 1023], 1023)
    check_token_ids([], 1023)
    check_token_ids([10**9], None)


@pytest.mark.parametrize("field", ["messages", "prompt"])
def test_an_empty_array_where_the_prompt_goes_is_refused_as_openai_refuses_it(field: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_not_empty({field: []}, field)
    assert (caught.value.param, caught.value.code) == (field, "empty_array")
    assert caught.value.message == (
        f"Invalid '{field}': empty array. Expected an array with minimum length 1, but got an empty array instead."
    )
    for body in ({field: ["x"]}, {field: ""}, {}):  # an empty string is the schema's to judge
        check_not_empty(body, field)


@pytest.mark.parametrize(
    ("prompt", "param"), [([[]], "prompt[0]"), ([[1, 2], []], "prompt[1]"), (["a", []], "prompt[1]")]
)
def test_an_empty_prompt_in_a_batch_is_refused_naming_its_place(prompt: list[object], param: str) -> None:
    # vLLM's engine refused it naming no field: "The decoder prompt cannot be empty".
    with pytest.raises(InvalidRequestError) as caught:
        check_not_empty({"prompt": prompt}, "prompt")
    assert (caught.value.param, caught.value.code) == (param, "empty_array")
    check_not_empty({"messages": [[]]}, "messages")  # a message is vLLM's schema's to judge


@pytest.mark.parametrize(
    "prompt, param", [([5, 1024], "prompt[1]"), ([[1, 2], [3, 1024]], "prompt[1][1]"), (["a", [-1]], "prompt[1][0]")]
)
def test_a_prompts_ids_past_the_vocabulary_are_refused_naming_their_place(prompt: list[object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_prompt_ids(prompt, 1023)
    assert caught.value.param == param


def test_text_prompts_and_ids_in_the_vocabulary_pass() -> None:
    for prompt in ("text", ["a", "b"], [1, 1023], [[0], [1023]], [], None):
        check_prompt_ids(prompt, 1023)


def test_an_empty_responses_input_is_refused_only_where_nothing_else_makes_a_conversation() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_input({"input": []})
    assert (caught.value.param, caught.value.code) == ("input", "empty_array")
    check_input({"input": [], "previous_response_id": "resp_1"})
    check_input({"input": [], "instructions": "Be brief."})
    check_input({"input": "hi"})


@pytest.mark.parametrize("content", ["Sure, ", "{\n", [{"type": "text", "text": "a"}, {"type": "text", "text": "b "}]])
def test_a_prefill_ending_in_whitespace_is_refused_as_anthropic_refuses_it(content: object) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]}
    with pytest.raises(InvalidRequestError) as caught:
        check_prefill(body)
    assert caught.value.param == "messages[1].content"
    assert "trailing whitespace" in caught.value.message


def test_a_prefill_without_trailing_whitespace_and_a_user_turn_last_pass() -> None:
    check_prefill({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure,"}]})
    check_prefill({"messages": [{"role": "user", "content": "Hi "}]})


ASKED = {"role": "user", "content": "Write a haiku about rain."}
ANSWERED = {"role": "assistant", "content": "Soft rain on the roof"}


@pytest.mark.parametrize("empty", ["", [], [{"type": "text", "text": ""}]])
def test_an_empty_user_turn_is_refused_not_dropped_into_a_prefill_of_the_answer_before(empty: object) -> None:
    # vLLM drops the empty turn; the assistant's answer before it, last then, was continued.
    with pytest.raises(InvalidRequestError) as refused:
        check_message_content({"messages": [ASKED, ANSWERED, {"role": "user", "content": empty}]})
    if empty == [{"type": "text", "text": ""}]:
        assert refused.value.message == "messages.2.content.0: text content blocks must be non-empty"
        assert refused.value.param == "messages[2].content[0].text"
    else:
        assert refused.value.message == (
            "messages.2: all messages must have non-empty content except for the optional final assistant message"
        )
        assert refused.value.param == "messages[2].content"


def test_an_empty_text_block_beside_others_and_in_the_system_prompt_is_refused() -> None:
    blocks = [{"type": "text", "text": "Hi"}, {"type": "text", "text": ""}]
    with pytest.raises(InvalidRequestError) as refused:
        check_message_content({"messages": [{"role": "user", "content": blocks}]})
    assert refused.value.param == "messages[0].content[1].text"
    with pytest.raises(InvalidRequestError) as refused:
        check_message_content({"messages": [ASKED], "system": [{"type": "text", "text": ""}]})
    assert refused.value.message == "system.0: text content blocks must be non-empty"
    assert refused.value.param == "system[0].text"


def test_assistant_turns_however_empty_and_shapes_for_vllms_schema_pass() -> None:
    check_message_content({"messages": [ASKED, {"role": "assistant", "content": ""}]})
    # vLLM's answer that generated no text, sent back (streamed, it has no block at all).
    for answered in ([{"type": "text", "text": ""}], []):
        check_message_content({"messages": [ASKED, {"role": "assistant", "content": answered}, ASKED]})
    check_message_content({"messages": [ASKED, ANSWERED, {"role": "user", "content": " "}], "system": "Be brief"})
    check_message_content({"messages": "hi", "system": [1]})
    check_message_content({"messages": [1, {"content": [1, {"type": "image"}]}]})
