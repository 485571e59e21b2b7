"""Anthropic Messages API shapes (``POST /v1/messages``,
``POST /v1/messages/count_tokens``), for the OpenAPI document only.

The ingress reads only ``model``, ``stream`` and ``metadata.user_id`` of a
request (``gateway.protocol.envelope.MessagesEnvelope``); the rest travels to
the model's replica and is validated there by vLLM's own schema, and the
answers are vLLM's bytes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class MessageCreateRequest(_Open):
    model: str = Field(min_length=1, description="Model or alias that should serve the request.")
    messages: list[dict[str, Any]] = Field(description="The conversation: `user` and `assistant` turns.")
    max_tokens: int = Field(ge=1, description="The most tokens to generate.")
    system: str | list[dict[str, Any]] | None = Field(None, description="The system prompt.")
    stream: bool | None = False
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = Field(None, description="Tools, on models with a tool parser.")
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = Field(None, description="`user_id` is also the cohort key of sticky A/B routing.")


class CountTokensRequest(_Open):
    model: str = Field(min_length=1, description="Model or alias whose tokenizer counts.")
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


class MessageUsage(_Open):
    input_tokens: int
    output_tokens: int


class Message(_Open):
    """A whole answer (`stream` false)."""

    id: str = Field(description="`msg_<request id>`: the request's `x-request-id`, also sent as `request-id`.")
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[dict[str, Any]] = Field(description="`text` and `tool_use` blocks.")
    model: str = Field(description="The model (variant) that answered")
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: MessageUsage


class MessageStreamEvent(_Open):
    """One streamed event; its SSE ``event:`` line repeats ``type``
    (``message_start``, ``content_block_start``, ``content_block_delta``, ...,
    ``message_delta``, ``message_stop``; ``error`` ends a failed stream)."""

    type: str


class TokenCount(_Open):
    input_tokens: int


class AnthropicErrorBody(BaseModel):
    type: str = Field(description="`invalid_request_error`, `authentication_error`, `not_found_error`, "
                      "`request_too_large`, `rate_limit_error`, `timeout_error`, `api_error`, `overloaded_error`")
    message: str


class AnthropicErrorResponse(BaseModel):
    """Every error on the Messages API's routes, in Anthropic's envelope."""

    type: Literal["error"] = "error"
    error: AnthropicErrorBody
