"""models/llm/tiny.py: the chat template and model shapes (no model is built here)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.llm.tiny import CHAT_TEMPLATE, TINY_CHAT_MODELS

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
]


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _render(messages: list[dict[str, Any]], *, add_generation_prompt: bool = False, **kwargs: Any) -> str:
    # The environment transformers' apply_chat_template (and so vLLM) renders with.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    template = env.from_string(CHAT_TEMPLATE)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)


def test_plain_conversation_renders_each_turn_in_order() -> None:
    rendered = _render(CONVERSATION)

    system = rendered.index("<|im_start|>system\nBe brief.<|im_end|>")
    user = rendered.index("<|im_start|>user\nHi there<|im_end|>")
    assert system < user
    assert rendered.count("<|im_start|>") == 2
    assert "assistant" not in rendered


def test_plain_conversation_is_chatml() -> None:
    assert _render(CONVERSATION) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    )


def test_generation_prompt_opens_an_assistant_turn() -> None:
    without = _render(CONVERSATION)
    with_prompt = _render(CONVERSATION, add_generation_prompt=True)

    assert with_prompt.endswith("<|im_start|>assistant\n")
    assert with_prompt == without + "<|im_start|>assistant\n"


def test_list_of_parts_renders_text_parts_only() -> None:
    content = [
        {"type": "text", "text": "Look at "},
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}},
        {"type": "text", "text": "this."},
    ]

    rendered = _render([{"role": "user", "content": content}])

    assert "<|im_start|>user\nLook at this.<|im_end|>" in rendered
    assert "example.com" not in rendered


def test_tools_are_listed_in_a_system_turn_before_the_messages() -> None:
    rendered = _render(CONVERSATION[1:], tools=TOOLS, add_generation_prompt=True)

    assert rendered.startswith("<|im_start|>system\nYou can call these functions:")
    first_message = rendered.index("<|im_start|>user\nHi there<|im_end|>")
    for tool in TOOLS:
        assert 0 < rendered.index(json.dumps(tool)) < first_message


def test_tools_are_listed_one_per_line() -> None:
    rendered = _render(CONVERSATION[1:], tools=TOOLS)

    assert rendered.startswith(
        "<|im_start|>system\nYou can call these functions:\n"
        f"{json.dumps(TOOLS[0])}\n{json.dumps(TOOLS[1])}\n<|im_end|>\n"
    )


def test_no_tools_no_tool_turn() -> None:
    assert "You can call these functions" not in _render(CONVERSATION, tools=None)


def test_assistant_tool_calls_are_rendered_back() -> None:
    call = {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": call}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]

    rendered = _render(messages, tools=TOOLS[:1], add_generation_prompt=True)

    assert f"<|im_start|>assistant\n<tool_call>{json.dumps(call)}</tool_call><|im_end|>" in rendered
    assert "<|im_start|>tool\nsunny<|im_end|>" in rendered
    assert rendered.index("<tool_call>") < rendered.index("<|im_start|>tool")


def test_tiny_models_are_distinguishable() -> None:
    assert len({spec.seed for spec in TINY_CHAT_MODELS}) == len(TINY_CHAT_MODELS)
    assert len({spec.name for spec in TINY_CHAT_MODELS}) == len(TINY_CHAT_MODELS)


@pytest.mark.parametrize("spec", TINY_CHAT_MODELS, ids=lambda s: s.name)
def test_tiny_model_head_dim_is_64(spec: Any) -> None:
    # vLLM's CPU attention rejects smaller heads.
    assert spec.hidden_size % spec.num_heads == 0
    assert spec.hidden_size // spec.num_heads == 64
    assert spec.num_heads % spec.num_kv_heads == 0
