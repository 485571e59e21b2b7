"""The ingress's own prompt count equals vLLM's, request by request."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway.auth.prompt_count import counter_for
from tests.integration.conftest import VLLM_MODEL, Gateway

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}

CHATS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the sea?"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Tell me about rivers."}]},
    {"messages": [{"role": "user", "content": "Ünïcödé · 海 · 🌊 — “quotes” and tabs\tand\nnewlines"}]},
    {"messages": [{"role": "user", "content": "word " * 120}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "First part."},
                                               {"type": "text", "text": " Second part."}]}]},
    {"messages": [{"role": "user", "content": "   spaced    out   "}]},
    {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER], "tool_choice": "none"},
    {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}], "tools": [WEATHER],
     "tool_choice": "none"},
    {"messages": [{"role": "user", "content": "Hi", "name": "alice"}]},
    {"messages": [{"role": "user", "content": "No prompt for the assistant"}], "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": "Kwargs the template ignores"}], "chat_template_kwargs": {"x": 1}},
    {"messages": [{"role": "user", "content": "Two choices"}], "n": 2},
    {"messages": [{"role": "user", "content": "Special"}], "add_special_tokens": True},
    {"messages": [{"role": "user", "content": ""}]},
]
COMPLETIONS: list[dict[str, Any]] = [
    {"prompt": "Once upon a time"},
    {"prompt": ["The sea", "is wide and deep, ünïcödé 海"]},
    {"prompt": [1, 2, 3, 4, 5]},
    {"prompt": "No special tokens", "add_special_tokens": False},
]


@pytest.fixture(scope="module")
def counter(gateway: Gateway) -> Any:
    info = gateway.call(VLLM_MODEL, "info")
    made = counter_for(info.tokenizer)
    assert made is not None, "the vLLM replica describes no tokenizer"
    return made


@pytest.mark.parametrize("body", CHATS, ids=range(len(CHATS)))
async def test_chat_prompts_count_as_vllm_counts_them(gateway: Gateway, counter: Any, body: dict[str, Any]) -> None:
    request = {"model": VLLM_MODEL, "max_tokens": 1, **body}
    counted = counter.prompt_tokens("chat", request)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http:
        answer = await http.post("/v1/chat/completions", json=request)
    assert answer.status_code == 200, answer.text
    assert counted == [answer.json()["usage"]["prompt_tokens"]]


@pytest.mark.parametrize("body", COMPLETIONS, ids=range(len(COMPLETIONS)))
async def test_completion_prompts_count_as_vllm_counts_them(
    gateway: Gateway, counter: Any, body: dict[str, Any]
) -> None:
    request = {"model": VLLM_MODEL, "max_tokens": 1, **body}
    counted = counter.prompt_tokens("completion", request)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as http:
        answer = await http.post("/v1/completions", json=request)
    assert answer.status_code == 200, answer.text
    assert counted is not None and sum(counted) == answer.json()["usage"]["prompt_tokens"]


def test_what_is_not_mirrored_is_left_to_the_replica(counter: Any) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    for body in (
        {"messages": [{"role": "user", "content": [image]}]},
        {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 'x' }}"},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
         "continue_final_message": True, "add_generation_prompt": False},
        {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}]},
        {"messages": "not a list"},
    ):
        assert counter.prompt_tokens("chat", body) is None
    assert asyncio.iscoroutinefunction(test_chat_prompts_count_as_vllm_counts_them)
