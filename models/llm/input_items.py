"""A stored response's input items (``GET /v1/responses/{id}/input_items``).

The items are the request's own ``input`` as the client sent it, in OpenAI's
item shapes: a string is one user message, a message's string content one
``input_text`` part (``output_text`` for the assistant's), and every item
has an ``id`` and a ``status``. An item the client named keeps its id; the
others are named after the response and their place in it, so the same
item has the same id on every page. Items of earlier responses in the
conversation (``previous_response_id``) are those responses' own.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import InvalidRequestError
from gateway.protocol import relay

# An item's id prefix, by its type (OpenAI's where it has one).
_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def items_of(response_id: str, given: Any) -> list[dict[str, Any]]:
    """The input items of the response ``response_id``, made from its ``input``."""
    entries = [{"role": "user", "content": given}] if isinstance(given, str) else given
    if not isinstance(entries, list):
        return []
    base = response_id.removeprefix(relay.RESPONSE_PREFIX)
    return [_item(entry, f"{base}{index:04x}") for index, entry in enumerate(entries) if isinstance(entry, dict)]


def _item(entry: dict[str, Any], suffix: str) -> dict[str, Any]:
    kind = entry.get("type") or "message"
    item: dict[str, Any] = {**entry, "type": kind}
    if not isinstance(item.get("id"), str) or not item["id"]:
        item["id"] = f"{_PREFIXES.get(kind, 'item')}_{suffix}"
    content = entry.get("content")
    if kind == "message" and isinstance(content, str):
        if entry.get("role") == "assistant":
            item["content"] = [{"type": "output_text", "text": content, "annotations": []}]
        else:
            item["content"] = [{"type": "input_text", "text": content}]
    if kind in _PREFIXES:
        item.setdefault("status", "completed")
    return item


def page(items: list[dict[str, Any]], after: str | None, limit: int, order: str) -> bytes:
    """One page of ``items``, as OpenAI lists them: in ``order`` (``asc``:
    as sent), at most ``limit``, those after the item ``after`` when given."""
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise InvalidRequestError(f"Invalid 'after': this response has no input item '{after}'.", param="after")
        # Its last place: a client may have given two items one id, and a page
        # ending at the first must not lead back to it (the SDK would page for ever).
        start = len(ids) - ids[::-1].index(after)
    data = ordered[start : start + limit]
    answer = {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + limit < len(ordered),
    }
    return json.dumps(answer, separators=(",", ":")).encode()
