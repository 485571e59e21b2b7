"""models/llm/vllm_messages.py: a Messages answer under vLLM is ``msg_<request id>``, whole or streamed."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from models.llm import vllm_compat, vllm_messages
from models.llm.tally import GenerationTally
from models.llm.vllm_streams import named_events

ASK = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}


def vllms_layer() -> Any:
    """vLLM's Anthropic layer as the gateway registers it (its conversions
    keep no state on the serving object, so they run unbound)."""
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages as Messages

    messages = SimpleNamespace(
        to_chat_completion_request=Messages.to_chat_completion_request,
        messages_full_converter=functools.partial(Messages.messages_full_converter, None),
        message_stream_converter=functools.partial(Messages.message_stream_converter, None),
        create_messages=None,
        count_tokens=None,
    )
    serving = vllm_compat.Serving(engine=SimpleNamespace(errored=False), model_config=None, max_model_len=64)
    serving.messages = messages
    vllm_compat._register_endpoints(serving)
    return messages


def chat_request_for(messages: Any, request_id: str | None, ask: dict[str, Any] = ASK) -> Any:
    """The chat request vLLM's Anthropic layer makes of ``ask`` while the
    gateway hands it request ``request_id`` (None: outside a request)."""
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest

    token = vllm_messages.REQUEST_ID.set(request_id)
    try:
        return messages.to_chat_completion_request(AnthropicMessagesRequest.model_validate(ask))
    finally:
        vllm_messages.REQUEST_ID.reset(token)


def chat_id_of(chat_request: Any) -> str:
    """The id vLLM's chat serving gives its answer to ``chat_request`` (no raw HTTP request)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    return f"chatcmpl-{OpenAIServingChat._base_request_id(None, chat_request.request_id)}"


def test_the_chat_request_vllm_makes_takes_the_requests_id() -> None:
    messages = vllms_layer()
    assert chat_id_of(chat_request_for(messages, "req-1")) == "chatcmpl-req-1"  # as a chat request's
    # Outside a request (rendering a prompt to count it) vLLM's own random id stays.
    assert chat_request_for(messages, None).request_id != chat_request_for(messages, None).request_id


def test_a_prefill_is_continued_not_answered_in_a_new_turn() -> None:
    messages = vllms_layer()
    asked = chat_request_for(messages, "req-1")
    assert (asked.add_generation_prompt, asked.continue_final_message) == (True, False)
    for prefill in ("{", [{"type": "text", "text": "Sure"}, {"type": "text", "text": ", {"}]):
        turns = [*ASK["messages"], {"role": "assistant", "content": prefill}]
        chat = chat_request_for(messages, "req-1", {**ASK, "messages": turns})
        assert (chat.add_generation_prompt, chat.continue_final_message) == (False, True)


def test_an_assistants_tool_call_last_is_not_a_prefill() -> None:
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}
    chat = chat_request_for(vllms_layer(), "req-1", {**ASK, "messages": [*ASK["messages"], call]})
    assert chat.continue_final_message is False


def test_an_auto_tool_choice_without_tools_asks_for_no_calls() -> None:
    # vLLM made it chat's "auto" with no tools: refused on a model without a tool
    # parser in its command line's words ("--enable-auto-tool-choice").
    messages = vllms_layer()
    chat = chat_request_for(messages, "req-1", {**ASK, "tool_choice": {"type": "auto"}})
    assert (chat.tool_choice, chat.tools) == (None, None)
    tool = {"name": "f", "input_schema": {"type": "object"}}
    chat = chat_request_for(messages, "req-1", {**ASK, "tool_choice": {"type": "auto"}, "tools": [tool]})
    assert chat.tool_choice == "auto" and len(chat.tools) == 1


def test_a_whole_message_is_named_msg_and_the_request_id() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse

    messages = vllms_layer()
    answer = ChatCompletionResponse.model_validate({
        "id": chat_id_of(chat_request_for(messages, "req-1")),
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    })
    message = messages.messages_full_converter(answer)
    assert (message.id, message.content[0].text) == ("msg_req-1", "Hello")


def chat_frames(chat_id: str) -> list[str]:
    def chunk(**delta: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        return "data: " + json.dumps({"id": chat_id, "model": "m", "created": 1, "choices": [choice]}) + "\n\n"

    return [chunk(role="assistant", content=""), chunk(content="Hi"), "data: [DONE]\n\n"]


async def test_a_streamed_message_is_named_msg_and_the_request_id_and_closing_it_closes_vllms() -> None:
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

    messages = vllms_layer()
    chat_id = chat_id_of(chat_request_for(messages, "req-1"))
    closed = []

    async def chat() -> AsyncIterator[str]:
        try:
            for frame in chat_frames(chat_id):
                yield frame
        finally:
            closed.append(True)

    events = [frame.decode() async for frame in named_events(messages.message_stream_converter(chat()),
                                                             GenerationTally(started=0.0))]
    vllms = functools.partial(AnthropicServingMessages.message_stream_converter, None)
    plain = [event async for event in vllms(_replay(chat_frames(chat_id)))]
    start = json.loads(events[0].split("data: ", 1)[1])
    assert start["type"] == "message_start" and start["message"]["id"] == "msg_req-1"
    assert events[0] == plain[0].replace(f'"id":"{chat_id}"', '"id":"msg_req-1"')  # every other byte vLLM's
    assert events[1:] == plain[1:] and closed == [True]


def test_omitted_thinking_keeps_its_block_and_signature_without_its_text() -> None:
    # thinking.display "omitted": vLLM ignores it and sent the reasoning whole.
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse

    answer = ChatCompletionResponse.model_validate({
        "id": "chatcmpl-req-1", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "reasoning": "Let me see", "content": "Hello"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
    })
    message = vllms_layer().messages_full_converter(answer)
    omitted = {"type": "enabled", "budget_tokens": 1024, "display": "omitted"}
    assert vllm_messages.thinking_omitted({"thinking": omitted})
    assert not vllm_messages.thinking_omitted({"thinking": {"type": "enabled", "budget_tokens": 1024}})
    vllm_messages.omit_thinking(message)
    body = json.loads(vllm_compat.body_json(message, "messages"))
    thinking, text = body["content"]
    assert thinking["type"] == "thinking" and thinking["thinking"] == "" and thinking["signature"]
    assert text == {"type": "text", "text": "Hello"}


async def test_an_omitted_thinking_stream_sends_the_block_and_its_signature_but_no_text() -> None:
    messages = vllms_layer()

    def chunk(**delta: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        return "data: " + json.dumps({"id": "chatcmpl-1", "model": "m", "created": 1, "choices": [choice]}) + "\n\n"

    frames = [chunk(role="assistant", content=""), chunk(reasoning="Let me see"), chunk(reasoning=' "type":"x"'),
              chunk(content="Hi"), "data: [DONE]\n\n"]
    whole = [e.decode() async for e in named_events(messages.message_stream_converter(_replay(frames)),
                                                     GenerationTally(started=0.0))]
    omitted = [e.decode() async for e in named_events(messages.message_stream_converter(_replay(frames)),
                                                       GenerationTally(started=0.0), vllm_messages.thinking_text)]
    assert sum('"thinking_delta"' in e for e in whole) == 2
    unsigned = [re.sub(r'"signature":"\w+"', "", e) for e in omitted]  # (a random one each stream)
    assert unsigned == [re.sub(r'"signature":"\w+"', "", e) for e in whole if '"thinking_delta"' not in e]
    assert any('"signature_delta"' in e for e in omitted) and any('"text":"Hi"' in e for e in omitted)
    assert any('"content_block":{"type":"thinking","thinking":""' in e for e in omitted)


async def _replay(frames: list[str]) -> AsyncIterator[str]:
    for frame in frames:
        yield frame


def test_a_whole_message_always_has_its_stop_sequence() -> None:
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesResponse

    answer = AnthropicMessagesResponse.model_validate({
        "id": "msg_1", "content": [{"type": "text", "text": "Ahoy é"}], "model": "m", "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 2},
    })
    body = vllm_compat.body_json(answer, "messages")
    assert list(json.loads(body)) == ["id", "type", "role", "content", "model", "stop_reason", "stop_sequence", "usage"]
    assert json.loads(body)["stop_sequence"] is None and "Ahoy é".encode() in body
    stopped = answer.model_copy(update={"stop_reason": "stop_sequence", "stop_sequence": "END"})
    assert json.loads(vllm_compat.body_json(stopped, "messages"))["stop_sequence"] == "END"


@pytest.mark.parametrize(("thinking", "effort"), [(None, "none"), ({"type": "disabled"}, "low")])
async def test_a_messages_prompt_counted_for_a_key_renders_disabled_thinking_as_vllm_generates_it(
    thinking: dict[str, str] | None, effort: str
) -> None:
    # It was always rendered with effort "none": a template that refuses it (Harmony's) answered a
    # key with a token limit 400 for a request that generates well.
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest

    made: list[str] = []

    async def probed() -> str:
        return "low"  # what vLLM's probe finds for a template refusing or ignoring "none"

    def to_chat(request: Any, merge_inline_system: bool, disabled_thinking_effort: str = "none") -> Any:
        made.append(disabled_thinking_effort)
        return request

    async def render_chat_request(request: Any) -> Any:
        return None, ["prompt"]

    serving = vllm_compat.Serving(engine=SimpleNamespace(errored=False), model_config=None, max_model_len=64)
    serving.messages = SimpleNamespace(
        to_chat_completion_request=to_chat,
        _merge_inline_system=False,
        _get_disabled_thinking_effort=probed,
        render_chat_request=render_chat_request,
    )
    ask = AnthropicMessagesRequest.model_validate({**ASK, **({"thinking": thinking} if thinking else {})})
    assert await vllm_compat.render(serving, "messages", ask) == ["prompt"]
    assert made == [effort]
