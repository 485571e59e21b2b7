"""OpenAI Responses API shapes (``POST /v1/responses``), for the OpenAPI document only.

The ingress reads only ``model``, ``stream`` and ``user`` of a request (see
``gateway.protocol.envelope``); the rest travels to the model's replica and
is validated there by vLLM's own schema, and the answers are vLLM's bytes.
These models describe both to ``/docs`` and to client generators.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ResponseCreateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # vLLM's sampling extensions travel too

    model: str = Field(min_length=1, description="Model or alias that should serve the request.")
    input: str | list[dict[str, Any]] = Field(description="Text, or a list of input items (messages, tool outputs).")
    instructions: str | None = Field(None, description="A system message put before the input.")
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool | None = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = Field(None, description="Function tools, on models with a tool parser.")
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = Field(None, description='`{"format": {"type": "json_schema", ...}}` and the like.')
    store: bool | None = Field(
        None,
        description="Keep the response (the default) for `GET /v1/responses/{id}` and `previous_response_id`, "
        "until `DELETE /v1/responses/{id}`.",
    )
    previous_response_id: str | None = Field(
        None,
        description="Continue the conversation of a stored response: answered by the variant and replica "
        "that keep it.",
    )
    background: bool | None = Field(
        None,
        description="Answer at once (`queued`) and generate on: `GET /v1/responses/{id}` retrieves it "
        "(with `stream=true`, its events), `POST /v1/responses/{id}/cancel` stops it, "
        "`DELETE /v1/responses/{id}` stops and deletes it.",
    )
    user: str | None = Field(None, description="Also the cohort key of sticky A/B routing.")
    metadata: dict[str, str] | None = None


class ResponseUsage(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_tokens: int
    output_tokens: int
    total_tokens: int


class ResponseObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(description="`resp_`, the id of the replica that stores it, and the request's id")
    object: Literal["response"] = "response"
    created_at: float
    model: str = Field(description="The model (variant) that answered")
    status: str
    output: list[dict[str, Any]]
    usage: ResponseUsage | None = None


class ResponseDeleted(BaseModel):
    """``DELETE /v1/responses/{id}``: the response, its conversation and its
    events are gone; the id is unknown from then on."""

    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class InputTokensRequest(BaseModel):
    """``POST /v1/responses/input_tokens``: the prompt tokens a ``POST
    /v1/responses`` with these fields would be billed (its ``usage.input_tokens``);
    fields that only shape the answer are refused."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Model or alias whose tokenizer and chat template count.")
    input: str | list[dict[str, Any]] = Field(description="Text, or a list of input items.")
    instructions: str | None = None
    previous_response_id: str | None = Field(
        None, description="Count the stored response's conversation too: answered by the replica that keeps it."
    )
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM's: they change the rendering.")


class InputTokenCount(BaseModel):
    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int


class InputItemList(BaseModel):
    """``GET /v1/responses/{id}/input_items``: the request's ``input`` as sent,
    as OpenAI's items (each with an ``id`` and ``status``), ``order`` ``desc``
    (last first) unless asked ``asc``, ``limit`` (1 to 100, default 20) at a
    time, those after the item ``after`` when given."""

    model_config = ConfigDict(extra="allow")

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseStreamEvent(BaseModel):
    """One streamed event; its SSE ``event:`` line repeats ``type``
    (``response.created``, ``response.output_text.delta``, ...,
    ``response.completed``; ``error`` ends a failed stream)."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int | None = None
