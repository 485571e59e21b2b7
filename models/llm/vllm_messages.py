"""A Messages API answer's ``id`` under vLLM: ``msg_<request id>``, as the
echo engine makes it, where the chat completions answer to the same
request is ``chatcmpl-<request id>``.

vLLM's Anthropic layer converts a Messages request into a chat request and
answers with that chat completion's id. The chat request it makes has a
random ``request_id``, and no raw HTTP request is passed to it for vLLM to
read ``x-request-id`` from, so the id was ``chatcmpl-<random>``: unrelated
to the request's id, and not Anthropic's ``msg_`` form. Here the chat
request takes the gateway's request id (``REQUEST_ID``, set while vLLM's
serving layer handles the request: its engine request is then named as a
chat request's is), and the answer, whole or streamed (``message_start``),
names the message ``msg_<request id>``.

A last ``assistant`` message is a prefill, as in Anthropic's API: the answer
continues its text. vLLM's conversion closed that turn and opened a new one
(its chat request asks for the generation prompt), so a prefilled ``{`` did
not make the answer go on as JSON; the converted request continues the final
message instead (``continue_final_message``), as a chat request may ask.

``thinking.display: "omitted"`` is honoured as Anthropic's API honours it:
thinking blocks come with their signature and no text (vLLM ignores the
field and sent the reasoning whole).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

# The gateway's id of the request being handed to vLLM's serving layer
# (``models.llm.vllm_engine``); None outside one.
REQUEST_ID: ContextVar[str | None] = ContextVar("messages_request_id", default=None)

CHAT_PREFIX = "chatcmpl-"
MESSAGE_PREFIX = "msg_"
_START = "event: message_start\n"


def message_id(chat_id: str) -> str:
    """The Messages id of the message vLLM answered as chat completion ``chat_id``."""
    return MESSAGE_PREFIX + chat_id.removeprefix(CHAT_PREFIX)


def identified(convert: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's ``to_chat_completion_request``, the chat request it returns
    taking ``REQUEST_ID`` (when set) as its ``request_id``, and continuing a
    prefill (see the module docstring)."""

    def converted(anthropic_request: Any, *args: Any, **kwargs: Any) -> Any:
        chat = convert(anthropic_request, *args, **kwargs)
        request_id = REQUEST_ID.get()
        if request_id is not None:
            chat.request_id = request_id
        if prefilled(chat.messages):
            chat.add_generation_prompt, chat.continue_final_message = False, True
        if chat.tool_choice == "auto" and not chat.tools:
            chat.tool_choice = None  # (no tools: no call to make, on a model without a tool parser too)
        return chat

    return converted


def prefilled(messages: list[Any]) -> bool:
    """Whether converted chat ``messages`` end with an assistant's text (not its tool calls) to continue."""
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return False
    return bool(last.get("content")) and not last.get("tool_calls")


def whole_identified(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """vLLM's conversion of a whole chat answer into a message, the message's
    ``id`` made from the chat completion's (``message_id``)."""

    def converted(answer: Any) -> Any:
        message = convert(answer)
        message.id = message_id(message.id)
        return message

    return converted


def whole_body(message: dict[str, Any]) -> bytes:
    """A whole message's JSON body, with ``stop_sequence`` after ``stop_reason``
    (null where no stop sequence ended it): Anthropic's message always has
    the key, and vLLM's leaves it out with every other unset field."""
    ordered: dict[str, Any] = {}
    for key, value in message.items():
        ordered[key] = value
        if key == "stop_reason":
            ordered.setdefault("stop_sequence", None)
    ordered.setdefault("stop_sequence", None)
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()


def thinking_omitted(body: dict[str, Any]) -> bool:
    """Whether a Messages request asks for its thinking blocks without their text."""
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("display") == "omitted"


def omit_thinking(message: Any) -> None:
    """Empties a whole message's thinking blocks (vLLM's parsed answer); their signatures stay."""
    for block in getattr(message, "content", None) or ():
        if getattr(block, "type", None) == "thinking":
            block.thinking = ""


def thinking_text(event: str) -> bool:
    """Whether a stream's event carries thinking text (a ``thinking_delta``;
    the JSON of any text it holds escapes its quotes, so none matches)."""
    return event.startswith("event: content_block_delta\n") and '"type":"thinking_delta"' in event


def start_identified(event: str) -> str:
    """A stream's first event: ``message_start``, its message's id made from
    the chat completion's (``message_id``) where it stands, every other byte
    as vLLM wrote it; any other event as it is."""
    if not event.startswith(_START):
        return event
    data = json.loads(event.split("data: ", 1)[1])
    chat_id = data.get("message", {}).get("id")
    if not isinstance(chat_id, str):
        return event
    return event.replace(f'"id":{json.dumps(chat_id)}', f'"id":{json.dumps(message_id(chat_id))}', 1)
