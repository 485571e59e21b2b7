"""The echo engine's Responses API (``POST /v1/responses``, stored responses).

It answers with the text of the last user message of the input, in OpenAI's
shapes: the response object, or the event sequence of a stream
(``response.created`` ... ``response.output_text.delta`` ...
``response.completed``). Stored responses keep their conversation, so a
follow-up (``previous_response_id``) is prompted with every earlier turn:
its ``usage.input_tokens`` counts them, as a real model's would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from gateway.errors import InvalidRequestError, ResponseNotFoundError

Turn = tuple[str, str]  # role, text


class EchoResponsesRequest(BaseModel):
    """The fields of OpenAI's request the echo reads; the rest are kept as sent."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: StrictBool | None = False
    store: StrictBool | None = True
    background: StrictBool | None = False
    previous_response_id: str | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)


@dataclass(slots=True)
class Stored:
    """A kept response: its body and the conversation it ends (its answer last)."""

    body: dict[str, Any]
    turns: list[Turn]


def turns_of(value: str | list[dict[str, Any]]) -> list[Turn]:
    """The messages of a request's ``input``: text, or input items."""
    if isinstance(value, str):
        return [("user", value)]
    turns: list[Turn] = []
    for item in value:
        content = item.get("content", item.get("output", ""))
        if isinstance(content, list):
            content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        turns.append((str(item.get("role", "user")), str(content)))
    return turns


def conversation(req: EchoResponsesRequest, previous: Stored | None) -> list[Turn]:
    """What the model is prompted with: instructions, earlier turns, the input."""
    turns = [("system", req.instructions)] if req.instructions else []
    return turns + (previous.turns if previous is not None else []) + turns_of(req.input)


def previous_of(req: EchoResponsesRequest, store: dict[str, Stored]) -> Stored | None:
    if req.background:
        raise InvalidRequestError("The echo engine does not run background responses.", param="background")
    if req.previous_response_id is None:
        return None
    previous = store.get(req.previous_response_id)
    if previous is None:
        raise ResponseNotFoundError.for_id(req.previous_response_id, "previous_response_id")
    return previous


def response_body(
    req: EchoResponsesRequest,
    response_id: str,
    model: str,
    created: int,
    status: Literal["in_progress", "completed", "incomplete"],
    text: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A response object as OpenAI sends it (``text`` None: no output yet)."""
    output = [] if text is None else [message_item(response_id, "completed", text)]
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": req.previous_response_id,
        "store": bool(req.store),
        "temperature": req.temperature if req.temperature is not None else 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": req.top_p if req.top_p is not None else 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
    }


def message_item(response_id: str, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "id": "msg_" + response_id.removeprefix("resp_"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


def events(final: dict[str, Any], tokens: list[str]) -> Iterator[bytes]:
    """A stream's events, numbered from 0: the final response ``final``'s
    creation, its text token by token, and its end."""
    response_id = final["id"]
    item_id = "msg_" + response_id.removeprefix("resp_")
    started = {**final, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    text = "".join(tokens)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    sequence: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
        ("response.output_item.added", {"output_index": 0, "item": message_item(response_id, "in_progress", None)}),
        ("response.content_part.added", {**where, "part": part}),
        *[("response.output_text.delta", {**where, "delta": token, "logprobs": []}) for token in tokens],
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": {**part, "text": text}}),
        ("response.output_item.done", {"output_index": 0, "item": final["output"][0]}),
        (f"response.{'completed' if final['status'] == 'completed' else 'incomplete'}", {"response": final}),
    ]
    for number, (kind, fields) in enumerate(sequence):
        data = json.dumps({"type": kind, "sequence_number": number, **fields}, separators=(",", ":"))
        yield f"event: {kind}\ndata: {data}\n\n".encode()


def now() -> int:
    return int(time.time())
