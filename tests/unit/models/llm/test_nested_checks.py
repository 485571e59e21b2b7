"""models/llm/nested_checks.py: keys inside a request's objects vLLM would drop."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequestError
from models.llm import vllm_errors
from models.llm.nested_checks import check_nested_keys, check_responses_settings, check_structured_outputs

HELLO = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def chat(**fields: Any) -> tuple[dict[str, Any], Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    body = {"model": "m", "messages": HELLO, **fields}
    return body, vllm_errors.validated(ChatCompletionRequest, body)


@pytest.mark.parametrize(
    ("fields", "place"),
    [
        # The tool reached the model with no parameters at all.
        ({"tools": [{"type": "function", "function": {"name": "f", "paramters": {"type": "object"}}}]},
         "tools[0].function.paramters"),
        ({"tools": [TOOL, {**TOOL, "functoin": {}}]}, "tools[1].functoin"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f", "argz": 1}}},
         "tool_choice.function.argz"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strictt": True}}},
         "response_format.json_schema.strictt"),
    ],
)
def test_a_key_vllms_parse_dropped_is_refused_naming_its_path(fields: dict[str, Any], place: str) -> None:
    body, parsed = chat(**fields)
    with pytest.raises(InvalidRequestError) as refused:
        check_nested_keys(body, parsed)
    assert (refused.value.param, refused.value.message) == (place, f"Unrecognized request argument supplied: {place}")


def test_objects_whose_every_key_vllm_took_pass() -> None:
    body, parsed = chat(
        tools=[{"type": "function", "function": {"name": "f", "description": "d", "strict": True,
                                                 "parameters": {"type": "object", "x-anything": 1}}}],
        tool_choice={"type": "function", "function": {"name": "f"}},
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        stream=True, stream_options={"include_usage": True, "include_obfuscation": False},  # a hint: taken
        structured_outputs=None,
    )  # fmt: skip
    check_nested_keys(body, parsed)


@pytest.mark.parametrize(
    ("given", "param", "says"),
    [
        ({"json": {"type": "object"}, "disable_any_whitespac": True}, "structured_outputs.disable_any_whitespac",
         "Unrecognized request argument supplied"),
        ({"regx": "a+"}, "structured_outputs.regx", "Unrecognized request argument supplied"),
        ({"disable_any_whitespace": True}, "structured_outputs", "got none."),
        ({"json": {"type": "object"}, "regex": "a+"}, "structured_outputs", "got 'json', 'regex'."),
        ({"regex": "a+", "response_format": {"type": "json_object"}}, "response_format", "not both"),
        # Of one kind, the format's would replace the client's own schema unsaid.
        ({"json": {"type": "object"}, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                                  "schema": {}}}},
         "response_format", "not both"),
        # vLLM takes no settings alone, a format's constraint beside them or not.
        ({"disable_any_whitespace": True, "response_format": {"type": "json_object"}}, "structured_outputs",
         "got none."),
    ],
)
def test_structured_outputs_are_refused_naming_the_field_not_printing_vllms_state(
    given: dict[str, Any], param: str, says: str
) -> None:
    fmt = given.pop("response_format", None)
    with pytest.raises(InvalidRequestError) as refused:
        check_structured_outputs({"structured_outputs": given, "response_format": fmt})
    assert refused.value.param == param and says in refused.value.message
    assert "_backend" not in refused.value.message


def test_one_structured_outputs_constraint_with_its_settings_passes() -> None:
    check_structured_outputs({"structured_outputs": {"json": {"type": "object"}, "disable_any_whitespace": True}})
    check_structured_outputs({"structured_outputs": {"choice": ["a", "b"]}})
    check_structured_outputs({"structured_outputs": {"choice": ["a", "b"]}, "response_format": {"type": "text"}})
    # A format vLLM's schema does not know is left to it.
    check_structured_outputs({"structured_outputs": {"regex": "a+"}, "response_format": {"type": "bogus"}})
    check_structured_outputs({"prompt": "hi"})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"text": {"format": {"type": "text"}, "verbosity": "high"}}, "text.verbosity"),
        ({"reasoning": {"effort": "low", "summary": "detailed"}}, "reasoning.summary"),
        ({"reasoning": {"generate_summary": "concise"}}, "reasoning.generate_summary"),
        ({"prompt": {"id": "pmpt_1", "variables": {"name": "Ann"}}}, "prompt"),  # answered without it, echoed back
    ],
)
def test_responses_settings_vllm_would_ignore_are_refused_naming_them(body: dict[str, Any], param: str) -> None:
    # vLLM validates them and never reads them: answered 200 without what was asked.
    with pytest.raises(InvalidRequestError) as refused:
        check_responses_settings({"input": "hi", **body}, tool_server=False)
    assert (refused.value.param, refused.value.code) == (param, "unsupported_parameter")


@pytest.mark.parametrize(
    "body",
    [
        {"text": {"verbosity": "medium"}},  # the default: what the answer gives
        {"text": {"verbosity": None, "format": {"type": "text"}}},
        {"reasoning": {"effort": "high", "summary": "auto"}},  # what is available: none
        {"reasoning": {"summary": None}},
        {"max_tool_calls": 3},  # without built-in tools it bounds nothing
        {"prompt": None},  # not asked for
    ],
)
def test_responses_settings_the_answer_honours_pass(body: dict[str, Any]) -> None:
    check_responses_settings({"input": "hi", **body}, tool_server=False)


def test_max_tool_calls_is_refused_where_built_in_tools_run() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_responses_settings({"input": "hi", "max_tool_calls": 1}, tool_server=True)
    assert refused.value.param == "max_tool_calls"
    check_responses_settings({"input": "hi", "max_tool_calls": None}, tool_server=True)


@pytest.mark.parametrize("body", [{"text": {"verbosity": ["low"]}}, {"reasoning": {"summary": {}}}])
def test_a_setting_of_the_wrong_type_is_left_to_the_schema_not_a_500(body: dict[str, Any]) -> None:
    check_responses_settings({"input": "hi", **body}, tool_server=False)  # vLLM's schema names it next
