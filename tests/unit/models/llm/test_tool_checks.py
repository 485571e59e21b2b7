"""Tool calls asked of a model that cannot make them, on vLLM's own parsed requests."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from gateway.errors import InvalidRequestError
from models.llm import vllm_compat
from models.llm.tool_checks import (
    check_anthropic_tools,
    check_builtin_tools,
    check_named_choice,
    check_tool_calls,
    check_tool_schemas,
)

TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
CLAUDE_TOOL = {"name": "weather", "input_schema": {"type": "object", "properties": {}}}


def _chat(**fields: Any) -> tuple[dict[str, Any], Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return body, ChatCompletionRequest.model_validate(dict(body))  # vLLM fills in its copy, as in the engine


def _responses(**fields: Any) -> tuple[dict[str, Any], Any]:
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    body = {"model": "m", "input": "hi", **fields}
    return body, ResponsesRequest.model_validate(dict(body))


RESPONSES_TOOL = {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}
PARSE = {"chat": _chat, "responses": _responses}


def _messages(**fields: Any) -> tuple[dict[str, Any], Any]:
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest

    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **fields}
    return body, AnthropicMessagesRequest.model_validate(dict(body))


@pytest.mark.parametrize(
    ("endpoint", "fields", "param"),
    [
        ("chat", {"tools": [TOOL]}, "tools"),  # "auto" by default
        ("chat", {"tools": [TOOL], "tool_choice": "auto"}, "tool_choice"),
        ("chat", {"tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
        ("chat", {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "weather"}}},
         "tool_choice"),
        ("messages", {"tools": [CLAUDE_TOOL]}, "tools"),
        ("messages", {"tools": [CLAUDE_TOOL], "tool_choice": {"type": "any"}}, "tool_choice"),
        ("messages", {"tools": [CLAUDE_TOOL], "tool_choice": {"type": "tool", "name": "weather"}}, "tool_choice"),
        # vLLM's Responses API answered these as plain text, the choice ignored.
        ("responses", {"tools": [RESPONSES_TOOL]}, "tools"),
        ("responses", {"tools": [RESPONSES_TOOL], "tool_choice": "required"}, "tool_choice"),
        ("responses", {"tools": [RESPONSES_TOOL], "tool_choice": {"type": "function", "name": "weather"}},
         "tool_choice"),
    ],
)
def test_tool_calls_asked_of_a_model_without_a_parser_are_refused_naming_the_field(
    endpoint: str, fields: dict[str, Any], param: str
) -> None:
    body, parsed = PARSE.get(endpoint, _messages)(**fields)
    with pytest.raises(InvalidRequestError) as caught:
        check_tool_calls(endpoint, body, parsed, "tiny", calls_tools=False)
    assert (caught.value.param, caught.value.code, caught.value.status_code) == (param, "unsupported_parameter", 400)
    assert caught.value.message.startswith(f"Unsupported parameter: '{param}': the model `tiny` is not set up to call")
    assert "`tool_call_parser`" in caught.value.message and "--" not in caught.value.message
    check_tool_calls(endpoint, body, parsed, "tiny", calls_tools=True)


@pytest.mark.parametrize(
    ("endpoint", "fields"),
    [
        ("chat", {}),
        ("chat", {"tools": [TOOL], "tool_choice": "none"}),
        ("messages", {}),
        ("messages", {"tools": [CLAUDE_TOOL], "tool_choice": {"type": "none"}}),
        ("responses", {}),
        ("responses", {"tools": [RESPONSES_TOOL], "tool_choice": "none"}),
    ],
)
def test_requests_that_ask_for_no_calls_pass_without_a_parser(endpoint: str, fields: dict[str, Any]) -> None:
    body, parsed = PARSE.get(endpoint, _messages)(**fields)
    check_tool_calls(endpoint, body, parsed, "tiny", calls_tools=False)


def test_counting_a_messages_tools_on_a_model_without_a_parser_is_refused_naming_tools() -> None:
    # vLLM's count renders the tools with chat's "auto" choice: refused in its command line's words.
    from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [CLAUDE_TOOL]}
    parsed = AnthropicCountTokensRequest.model_validate(dict(body))
    with pytest.raises(InvalidRequestError) as caught:
        check_tool_calls("messages_count", body, parsed, "tiny", calls_tools=False)
    assert caught.value.param == "tools" and '`tool_choice` {"type": "none"}' in caught.value.message
    none = {**body, "tool_choice": {"type": "none"}}
    check_tool_calls("messages_count", none, AnthropicCountTokensRequest.model_validate(dict(none)), "tiny", False)


def _serving(parser: Any, harmony: bool = False, tokenizer: Any = None) -> Any:
    renderer = SimpleNamespace(parser=parser, use_harmony=harmony, renderer=SimpleNamespace(tokenizer=tokenizer))
    return SimpleNamespace(chat=SimpleNamespace(online_renderer=renderer))


def test_a_model_calls_tools_with_a_tool_parser_or_as_a_harmony_model() -> None:
    assert vllm_compat.calls_tools(_serving(SimpleNamespace(tool_parser_cls=object)))
    assert vllm_compat.calls_tools(_serving(None, harmony=True))
    assert not vllm_compat.calls_tools(_serving(None))
    assert not vllm_compat.calls_tools(_serving(SimpleNamespace(tool_parser_cls=None)))  # a reasoning parser alone


@pytest.mark.parametrize("kind", ["web_search", "web_search_preview", "file_search", "code_interpreter", "mcp"])
def test_a_built_in_responses_tool_is_refused_where_no_tool_server_runs(kind: str) -> None:
    function = {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(InvalidRequestError) as refused:
        check_builtin_tools({"tools": [function, {"type": kind}]}, "m")
    assert (refused.value.param, refused.value.code) == ("tools[1].type", "unsupported_parameter")
    assert f"'{kind}'" in refused.value.message


def test_tools_vllm_renders_and_no_tools_pass() -> None:
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.tool_parsers.utils import get_function_tools

    tools = [
        {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}},
        {"type": "custom", "name": "apply_patch"},
        {"type": "namespace", "name": "ns", "description": "d", "tools": [
            {"type": "function", "name": "g", "parameters": {"type": "object", "properties": {}}}]},
    ]
    check_builtin_tools({"tools": tools}, "m")
    check_builtin_tools({}, "m")
    # vLLM renders each of them as a function (so none is dropped unsaid).
    parsed = ResponsesRequest.model_validate({"model": "m", "input": "hi", "tools": tools})
    assert len(get_function_tools(parsed.tools)) == len(tools)


ASKED = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}]}
ANSWERED = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "22C"}]}


def test_a_tool_result_answering_the_tool_use_before_it_passes() -> None:
    check_anthropic_tools({"tools": [CLAUDE_TOOL], "messages": [{"role": "user", "content": "Hi"}, ASKED, ANSWERED]})


def test_a_conversation_may_end_on_calls_and_text_may_follow_the_results() -> None:
    after = {"role": "user", "content": [*ANSWERED["content"], {"type": "text", "text": "And tomorrow?"}]}
    check_anthropic_tools({"tools": [CLAUDE_TOOL], "messages": [{"role": "user", "content": "Hi"}, ASKED, after]})
    check_anthropic_tools({"tools": [CLAUDE_TOOL], "messages": [{"role": "user", "content": "Hi"}, ASKED]})


def test_a_system_turn_between_calls_and_their_results_leaves_them_paired() -> None:
    # vLLM may move a system turn before the conversation: the user turn after it answers the calls.
    hi, system = {"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}
    check_anthropic_tools({"tools": [CLAUDE_TOOL], "messages": [hi, ASKED, system, ANSWERED]})
    with pytest.raises(InvalidRequestError, match="immediately after: toolu_1"):
        more = {"role": "user", "content": "More"}
        check_anthropic_tools({"tools": [CLAUDE_TOOL], "messages": [hi, ASKED, system, more]})


def test_parallel_calls_and_their_results_may_come_as_several_messages_of_one_turn() -> None:
    # Anthropic combines consecutive messages of one role into one turn.
    second = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {}}]}
    answered_second = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "9C"}]}
    hi = {"role": "user", "content": "Hi"}
    check_anthropic_tools({"tools": [CLAUDE_TOOL], "messages": [hi, ASKED, second, ANSWERED, answered_second]})
    both = {"role": "assistant", "content": [*ASKED["content"], *second["content"]]}
    check_anthropic_tools({"tools": [CLAUDE_TOOL], "messages": [hi, both, answered_second, ANSWERED]})
    with pytest.raises(InvalidRequestError) as refused:  # a result answers only the turn just before
        check_anthropic_tools({"tools": [CLAUDE_TOOL], "messages": [hi, ASKED, ANSWERED, second, ANSWERED]})
    assert refused.value.param == "messages[4].content[0].tool_use_id"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": [CLAUDE_TOOL, CLAUDE_TOOL]}, "tools", "Tool names must be unique"),
        ({"tool_choice": {"type": "any"}}, "tool_choice", "no `tools`"),
        ({"tool_choice": {"type": "tool", "name": "weather"}, "tools": []}, "tool_choice", "no `tools`"),
        ({"messages": [{"role": "user", "content": "Hi"}, ANSWERED]}, "messages[1].content[0].tool_use_id",
         "unexpected `tool_use_id`"),
        ({"messages": [ASKED, ANSWERED, {"role": "assistant", "content": "Sunny"}, ANSWERED]},
         "messages[3].content[0].tool_use_id", "in the previous message"),
        # Results come first in their turn: vLLM rendered the result before the text sent ahead of it.
        ({"messages": [ASKED, {"role": "user", "content": [{"type": "text", "text": "Here"}, *ANSWERED["content"]]}]},
         "messages[1].content[1]", "must come first"),
        ({"messages": [ASKED, {"role": "user", "content": "Hi"}, ANSWERED]}, "messages[2].content[0]",
         "must come first"),
        # A call the next turn leaves unanswered: the model read its question as never answered.
        ({"messages": [ASKED, {"role": "user", "content": "Thanks"}]}, "messages[0]",
         "ids were found without `tool_result` blocks immediately after: toolu_1"),
        ({"messages": [{**ASKED, "content": [*ASKED["content"], {**ASKED["content"][0], "id": "toolu_2"}]}, ANSWERED]},
         "messages[0]", "immediately after: toolu_2."),
    ],
    ids=["duplicate-names", "any-without-tools", "tool-without-tools", "no-tool-use", "not-the-previous-message",
         "text-before-result", "text-turn-before-result", "unanswered", "one-of-two-unanswered"],
)
def test_what_anthropic_refuses_of_tools_is_refused_in_its_words(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words) as refused:
        check_anthropic_tools(body)
    assert refused.value.param == param


def _chat_tool(parameters: object) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "weather", "parameters": parameters}}


@pytest.mark.parametrize(
    ("endpoint", "tool", "param"),
    [
        ("chat", _chat_tool({"type": "array", "items": {}}), "tools[0].function.parameters"),
        ("chat", _chat_tool({"type": "objekt"}), "tools[0].function.parameters"),
        ("responses", {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": 5}},
         "tools[0].parameters"),
        ("messages", {"name": "weather", "input_schema": {"type": "string"}}, "tools[0].input_schema"),
    ],
    ids=["chat-array", "chat-no-such-type", "responses-bad-properties", "messages-string"],
)
def test_tool_parameters_that_are_no_object_schema_are_refused(endpoint: str, tool: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_tool_schemas(endpoint, {"tools": [tool]})
    assert refused.value.param == param
    if endpoint == "messages":
        assert refused.value.message.startswith("tools.0.input_schema: schema must be a JSON Schema")
    else:
        assert refused.value.code == "invalid_function_parameters"
        assert refused.value.message.startswith("Invalid schema for function 'weather': ")


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"name": {"type": "string", "pattern": "^\\p{Lu}\\p{Ll}+$"}}},
        {"type": "object", "properties": {"year": {"type": "string", "pattern": "^(?<year>\\d{4})$"}}},
        {"type": "object", "properties": {"x": {"type": "string", "pattern": "a{99999999999}"}}},
        {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
         "properties": {"pair": {"type": "array", "items": [{"type": "string"}, {"type": "number"}]}}},
    ],
    ids=["unicode-classes", "named-group", "huge-repeat", "draft-07-tuple"],
)
def test_schemas_valid_in_json_schemas_own_terms_pass(schema: dict[str, Any]) -> None:
    # ECMA-262 patterns were judged by Python's regex engine (refused, or a 500 on the last), and
    # every schema as draft 2020-12 whatever its $schema.
    check_tool_schemas("chat", {"tools": [_chat_tool(schema)]})


def test_object_schemas_and_tools_without_parameters_pass() -> None:
    check_tool_schemas("chat", {"tools": [TOOL, _chat_tool({}), {"type": "function", "function": {"name": "f"}}]})
    check_tool_schemas("responses", {"tools": [{"type": "custom", "name": "apply_patch"}]})
    check_tool_schemas("messages", {"tools": [CLAUDE_TOOL]})


NAMESPACE = {"type": "namespace", "name": "ns", "description": "d", "tools": [{"type": "function", "name": "g"}]}


@pytest.mark.parametrize("tools", [None, [], [{"type": "function", "name": "f"}], [NAMESPACE]])
def test_a_named_tool_choice_without_that_tool_is_refused_naming_it(tools: object) -> None:
    with pytest.raises(InvalidRequestError, match="Tool choice 'weather' not found") as refused:
        check_named_choice({"tools": tools, "tool_choice": {"type": "function", "name": "weather"}})
    assert refused.value.param == "tool_choice.name"


@pytest.mark.parametrize("name", ["f", "apply_patch", "g", "ns__g"])
def test_a_named_tool_choice_of_a_given_tool_passes(name: str) -> None:
    tools = [{"type": "function", "name": "f"}, {"type": "custom", "name": "apply_patch"}, NAMESPACE]
    check_named_choice({"tools": tools, "tool_choice": {"type": "function", "name": name}})
    check_named_choice({"tools": tools, "tool_choice": "required"})


def test_a_schema_nested_too_deeply_to_check_is_a_400_not_a_500() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(400):
        schema = {"type": "array", "items": schema}
    parameters = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(InvalidRequestError, match="nested too deeply") as refused:
        check_tool_schemas("chat", {"tools": [_chat_tool(parameters)]})
    assert (refused.value.param, refused.value.code) == ("tools[0].function.parameters", "invalid_function_parameters")


def test_a_tool_result_holding_blocks_vllm_would_drop_is_refused_naming_the_block() -> None:
    """vLLM renders a tool_result's text, images and tool references and
    drops the rest: the model would have seen an empty result."""
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "The answer is 42"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "see:"}, document]}
    body = {"model": "m", "max_tokens": 4, "tools": [CLAUDE_TOOL],
            "messages": [{"role": "user", "content": "Hi"}, ASKED, {"role": "user", "content": [result]}]}
    rendered = AnthropicServingMessages.to_chat_completion_request(AnthropicMessagesRequest(**body))
    assert "42" not in str(rendered.messages)  # what vLLM would have served
    with pytest.raises(InvalidRequestError) as refused:
        check_anthropic_tools(body)
    assert refused.value.param == "messages[2].content[0].content[1].type" and "`document`" in refused.value.message
    result["content"] = [{"type": "text", "text": "The answer is 42"}, {"type": "image", "source": {}}]
    check_anthropic_tools(body)


def test_a_tool_use_without_its_id_and_a_result_without_its_tool_use_id_are_refused() -> None:
    # The two paired on the missing value: vLLM then rendered a result answering nothing.
    hi = {"role": "user", "content": "Hi"}
    no_id = {"role": "assistant", "content": [{"type": "tool_use", "name": "weather", "input": {}}]}
    no_ref = {"role": "user", "content": [{"type": "tool_result", "content": "22C"}]}
    with pytest.raises(InvalidRequestError) as refused:
        check_anthropic_tools({"tools": [CLAUDE_TOOL], "messages": [hi, no_id, no_ref]})
    assert refused.value.param == "messages[1].content[0].id"
    assert refused.value.message == "messages.1.content.0.tool_use.id: Field required"
    with pytest.raises(InvalidRequestError) as refused:
        check_anthropic_tools({"tools": [CLAUDE_TOOL], "messages": [hi, ASKED, no_ref]})
    assert refused.value.param == "messages[2].content[0].tool_use_id"
