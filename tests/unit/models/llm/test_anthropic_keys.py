"""models/llm/anthropic_keys.py: a key inside a Messages request that vLLM's
schema would drop is refused in Anthropic's words; Anthropic's hints pass."""

from __future__ import annotations

import typing
from typing import Any

import anthropic.types as sdk
import anthropic.types.beta as beta
import pytest

from gateway.errors import InvalidRequestError
from models.llm import anthropic_keys
from models.llm.anthropic_keys import BLOCKS, SOURCES, THINKING, Shape, check_keys

CACHED = {"cache_control": {"type": "ephemeral", "ttl": "1h"}}


def said(content: Any, **message: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": content, **message}]}


def refused(body: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as error:
        check_keys(body)
    return error.value


@pytest.mark.parametrize(
    ("body", "words", "param"),
    [
        (said("Hi", name="bob"), "messages.0.name", "messages[0].name"),
        (said([{"type": "tool_use", "id": "a", "name": "f", "input": {}, "text": "x"}]),
         "messages.0.content.0.tool_use.text", "messages[0].content[0].text"),
        (said([{"type": "text", "text": "Hi", "input": {}}]),
         "messages.0.content.0.text.input", "messages[0].content[0].input"),
        # As Anthropic: a thinking block is no cache breakpoint.
        (said([{"type": "thinking", "thinking": "t", "signature": "s", **CACHED}]),
         "messages.0.content.0.thinking.cache_control", "messages[0].content[0].cache_control"),
        (said([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA==", "url": "u"}}]),
         "messages.0.content.0.image.source.base64.url", "messages[0].content[0].source.url"),
        (said([{"type": "tool_result", "tool_use_id": "a", "content": [{"type": "text", "text": "4", "txt": "4"}]}]),
         "messages.0.content.0.tool_result.content.0.text.txt", "messages[0].content[0].content[0].txt"),
        ({"system": [{"type": "text", "text": "Be brief", "cache": True}]}, "system.0.cache", "system[0].cache"),
        ({"tools": [{"name": "f", "input_schema": {"type": "object"}, "descripton": "d"}]},
         "tools.0.custom.descripton", "tools[0].descripton"),
        ({"tool_choice": {"type": "auto", "disable_parallel_tool_us": True}},
         "tool_choice.auto.disable_parallel_tool_us", "tool_choice.disable_parallel_tool_us"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048, "budget": 1}},
         "thinking.enabled.budget", "thinking.budget"),
        ({"metadata": {"user_id": "u", "team": "a"}}, "metadata.team", "metadata.team"),
        ({"output_config": {"efort": "low"}}, "output_config.efort", "output_config.efort"),
        ({"output_config": {"format": {"type": "json_schema", "schema": {}, "strict": True}}},
         "output_config.format.json_schema.strict", "output_config.format.strict"),
        (said([{"type": "tool_addition", "tool": {"type": "tool_definition", "definition": {
            "name": "f", "input_schema": {}, "x": 1}}}]),
         "messages.0.content.0.tool_addition.tool.tool_definition.definition.custom.x",
         "messages[0].content[0].tool.definition.x"),
        # A null is refused too where no API has the key.
        (said("Hi", nmae=None), "messages.0.nmae", "messages[0].nmae"),
    ],
)
def test_a_key_vllm_would_drop_is_refused_naming_its_place(body: dict[str, Any], words: str, param: str) -> None:
    error = refused(body)
    assert (error.status_code, error.message, error.param, error.code) == (
        400, f"{words}: Extra inputs are not permitted", param, None
    )


@pytest.mark.parametrize(
    ("body", "param", "asks"),
    [
        (said([{"type": "text", "text": "Hi", "citations": [{"type": "char_location"}]}]),
         "messages[0].content[0].citations", "citations"),
        (said([{"type": "image", "source": {"type": "file", "file_id": "f1"}}]),
         "messages[0].content[0].source.type", "a `file` source"),
        (said([{"type": "tool_result", "tool_use_id": "a",
                "content": [{"type": "image", "source": {"file_id": "f"}}]}]),
         "messages[0].content[0].content[0].source.type", "this source"),
        (said([{"type": "tool_use", "id": "a", "name": "f", "input": {},
                "caller": {"type": "code_execution_20250825"}}]),
         "messages[0].content[0].caller", "programmatic tool calls"),
        ({"tools": [{"name": "f", "input_schema": {}, "input_examples": [{"x": 1}]}]},
         "tools[0].input_examples", "examples"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type", "'web_search_20250305'"),
    ],
)
def test_a_key_asking_for_what_the_model_does_not_serve_is_refused_naming_it(
    body: dict[str, Any], param: str, asks: str
) -> None:
    error = refused(body)
    assert (error.param, error.code) == (param, "unsupported_parameter")
    assert "this model does not serve" in error.message and asks in error.message


def test_anthropics_hints_and_nulls_pass() -> None:
    blocks = [
        {"type": "text", "text": "Hi", **CACHED, "citations": None},
        {"type": "text", "text": "Hi", "citations": []},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}, **CACHED},
        {"type": "tool_reference", "tool_name": "f", **CACHED},
    ]
    check_keys({
        **said(blocks),
        "system": [{"type": "text", "text": "Be brief", **CACHED}],
        "tools": [{"type": "custom", "name": "f", "input_schema": {"type": "object"}, "strict": True,
                   "eager_input_streaming": True, "input_examples": None, **CACHED}],
        "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
        "thinking": {"type": "adaptive", "display": "summarized", "block_binding": {}},
        "metadata": {"user_id": "u"},
        "output_config": {"effort": "low", "format": {"type": "json_schema", "schema": {"type": "object"}},
                          "task_budget": None},
    })
    turns = [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                          {"type": "tool_use", "id": "a", "name": "f", "input": {}, **CACHED,
                                           "caller": {"type": "direct"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "is_error": False, **CACHED,
                                      "content": [{"type": "text", "text": "4"}]}]},
    ]
    check_keys({"messages": turns})


@pytest.mark.parametrize(
    "body",
    [
        {**said("Hi"), "system": [{"type": "text", "text": "Be brief"},
                                  {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]},
        {"messages": [{"role": "system", "content": [{"type": "tool_reference", "tool_name": "f"}]}]},
    ],
    ids=["system", "system-turn"],
)
def test_a_system_prompt_holds_text_only(body: dict[str, Any]) -> None:
    # vLLM kept a system prompt's text blocks and dropped the rest: the image went unseen.
    error = refused(body)
    assert "does not match any of the expected tags: 'text'" in error.message
    assert error.param in ("system[1].type", "messages[0].content[0].type")


def test_a_system_turn_changes_the_tools_but_the_system_prompt_does_not() -> None:
    # vLLM applies tool changes from the messages (only a system turn may hold them), not from `system`.
    change = {"type": "tool_addition", "tool": {"type": "tool_reference", "name": "f"}}
    check_keys({**said("Hi"), "messages": [{"role": "system", "content": [change]}, *said("Hi")["messages"]]})
    assert refused({**said("Hi"), "system": [change]}).param == "system[0].type"


def test_parts_of_the_wrong_json_type_are_left_to_vllms_schema() -> None:
    check_keys({"messages": ["Hi", {"role": "user", "content": [1, {"type": "txt", "x": 1}]}], "tools": {"a": 1},
                "system": "Be brief", "thinking": {"type": "on", "x": 1}, "metadata": "u", "tool_choice": "auto"})


def sdk_keys(param: Any) -> set[str]:
    return set(typing.get_type_hints(param))


# The SDK's request shapes, each beside the shape the gateway checks it by.
SDK_SHAPES: list[tuple[Any, Shape]] = [
    (sdk.TextBlockParam, BLOCKS["text"]),
    (sdk.ImageBlockParam, BLOCKS["image"]),
    (sdk.ToolUseBlockParam, BLOCKS["tool_use"]),
    (sdk.ToolResultBlockParam, BLOCKS["tool_result"]),
    (sdk.ThinkingBlockParam, BLOCKS["thinking"]),
    (sdk.RedactedThinkingBlockParam, BLOCKS["redacted_thinking"]),
    (sdk.ToolReferenceBlockParam, BLOCKS["tool_reference"]),
    (sdk.Base64ImageSourceParam, SOURCES["base64"]),
    (sdk.URLImageSourceParam, SOURCES["url"]),
    (sdk.ToolParam, anthropic_keys.TOOL),
    (sdk.ToolChoiceAutoParam, anthropic_keys.TOOL_CHOICE),
    (sdk.ToolChoiceAnyParam, anthropic_keys.TOOL_CHOICE),
    (sdk.ToolChoiceToolParam, anthropic_keys.TOOL_CHOICE),
    (sdk.ToolChoiceNoneParam, anthropic_keys.TOOL_CHOICE),
    (sdk.ThinkingConfigEnabledParam, THINKING["enabled"]),
    (sdk.ThinkingConfigAdaptiveParam, THINKING["adaptive"]),
    (sdk.ThinkingConfigDisabledParam, THINKING["disabled"]),
    (sdk.MetadataParam, anthropic_keys.METADATA),
    (sdk.OutputConfigParam, anthropic_keys.OUTPUT_CONFIG),
    (sdk.JSONOutputFormatParam, anthropic_keys.FORMAT),
    *((role, anthropic_keys.MESSAGE) for role in (sdk.MessageParam.__args__)),  # type: ignore[attr-defined]
]
# The beta API's shapes of the same objects (clients such as Claude Code send those).
SDK_SHAPES += [
    (getattr(beta, "Beta" + param.__name__), shape)
    for param, shape in SDK_SHAPES
    if hasattr(beta, "Beta" + param.__name__)
]


@pytest.mark.parametrize(("param", "shape"), SDK_SHAPES, ids=lambda value: getattr(value, "__name__", ""))
def test_every_key_of_the_anthropic_sdks_shapes_is_read_taken_as_a_hint_or_refused_by_name(
    param: Any, shape: Shape
) -> None:
    # An SDK that adds a key fails here until it is placed.
    placed = shape.read | shape.hints | shape.unserved.keys()
    assert sdk_keys(param) <= placed, sorted(sdk_keys(param) - placed)


def test_what_counts_as_read_is_what_vllms_schema_keeps() -> None:
    from vllm.entrypoints.anthropic import protocol as vllm

    def fields(model: Any) -> set[str]:
        return {field.alias or name for name, field in model.model_fields.items()}

    block_fields = fields(vllm.AnthropicContentBlock)
    for kind, shape in BLOCKS.items():
        assert shape.read <= block_fields, kind
    # Every key of vLLM's one block shape is some type's, so a new one fails here until placed.
    assert block_fields <= set().union(*(shape.read for shape in BLOCKS.values()))
    # vLLM reads either name of a tool_result's reference.
    assert anthropic_keys.RESULT_BLOCKS["tool_reference"].read == {"type", "tool_name", "name"}
    # `type` of a tool only says it is the custom kind vLLM's tools are.
    assert anthropic_keys.TOOL.read - {"type"} == fields(vllm.AnthropicTool)
    assert anthropic_keys.TOOL_CHOICE.read == fields(vllm.AnthropicToolChoice)
    assert THINKING["enabled"].read == fields(vllm.AnthropicThinkingConfigEnabled)
    assert THINKING["adaptive"].read == fields(vllm.AnthropicThinkingConfigAdaptive)
    assert THINKING["disabled"].read == fields(vllm.AnthropicThinkingConfigDisabled)
    assert anthropic_keys.MESSAGE.read == fields(vllm.AnthropicMessage)
    assert anthropic_keys.OUTPUT_CONFIG.read == fields(vllm.AnthropicOutputConfig)
    assert anthropic_keys.FORMAT.read == fields(vllm.AnthropicJsonOutputFormat)
    assert anthropic_keys.TOOL_CHANGES["tool_reference"].read == fields(vllm.AnthropicToolChangeReference)
    assert anthropic_keys.TOOL_CHANGES["tool_definition"].read == fields(vllm.AnthropicToolChangeDefinition)
