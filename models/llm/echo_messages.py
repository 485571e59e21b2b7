"""The echo engine's Anthropic Messages API (``POST /v1/messages``,
``POST /v1/messages/count_tokens``).

It answers with the text of the last user message, in Anthropic's shapes:
the message object, or the event sequence of a stream (``message_start``,
``content_block_start``, ``content_block_delta`` per token,
``content_block_stop``, ``message_delta``, ``message_stop``). Tokens are
words, as everywhere in the echo engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from gateway import sse


class EchoMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]]


class EchoMessagesRequest(BaseModel):
    """The fields of Anthropic's request the echo reads; the rest are kept as sent."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[EchoMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: StrictBool | None = False


class EchoCountRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[EchoMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return " ".join(str(block.get("text", "")) for block in content if block.get("type") == "text")


def prompt_words(req: EchoMessagesRequest | EchoCountRequest) -> int:
    texts = [text_of(req.system), *(text_of(m.content) for m in req.messages)]
    return sum(len(text.split()) for text in texts)


def last_user_text(req: EchoMessagesRequest) -> str:
    asked = [text_of(m.content) for m in req.messages if m.role == "user"]
    return asked[-1] if asked else ""


def message(
    message_id: str,
    model: str,
    text: str,
    stop_reason: str,
    input_tokens: int,
    output_tokens: int,
    stop_sequence: str | None = None,
) -> dict[str, Any]:
    """A whole answer as Anthropic sends it (``stop_sequence``: the one that ended it)."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "model": model,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


def events(final: dict[str, Any], tokens: list[str]) -> Iterator[bytes]:
    """A stream's events for the whole answer ``final``, its text token by token."""
    usage = final["usage"]
    started = {**final, "content": [], "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 0}}
    yield sse.event("message_start", {"type": "message_start", "message": started})
    yield sse.event(
        "content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    )
    for token in tokens:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}}
        yield sse.event("content_block_delta", delta)
    yield sse.event("content_block_stop", {"type": "content_block_stop", "index": 0})
    ending = {"stop_reason": final["stop_reason"], "stop_sequence": final["stop_sequence"]}
    yield sse.event("message_delta", {"type": "message_delta", "delta": ending, "usage": {"output_tokens": usage["output_tokens"]}})
    yield sse.event("message_stop", {"type": "message_stop"})
