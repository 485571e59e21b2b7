"""models/llm/input_items.py: a stored response's input items, in OpenAI's shapes and pages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import ResponseItemList

from gateway.errors import InvalidRequestError
from models.llm.input_items import items_of, page

RESPONSE = "resp_0123456789abreq1"


def listed(items: list[dict[str, Any]], after: str | None = None, limit: int = 20, order: str = "desc") -> ResponseItemList:
    return ResponseItemList.model_validate(json.loads(page(items, after, limit, order)))


def test_a_string_input_is_one_user_message_with_an_input_text_part() -> None:
    [item] = items_of(RESPONSE, "the harbour at dawn")
    assert item == {
        "id": "msg_0123456789abreq10000",
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "the harbour at dawn"}],
        "status": "completed",
    }
    assert listed([item]).data[0].type == "message"  # the SDK reads it as an input message


def test_items_keep_what_was_sent_and_get_ids_and_statuses() -> None:
    given = [
        {"role": "system", "content": "be brief"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"role": "assistant", "content": "I will look."},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}", "id": "fc_mine"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    items = items_of(RESPONSE, given)
    assert [item["id"] for item in items] == [
        "msg_0123456789abreq10000",
        "msg_0123456789abreq10001",
        "msg_0123456789abreq10002",
        "fc_mine",  # named by the client: kept
        "fco_0123456789abreq10004",
    ]
    assert items[0]["content"] == [{"type": "input_text", "text": "be brief"}]
    assert items[2]["content"] == [{"type": "output_text", "text": "I will look.", "annotations": []}]
    assert items[4] == {**given[4], "id": "fco_0123456789abreq10004", "status": "completed"}
    assert given[0] == {"role": "system", "content": "be brief"}  # the stored input is not changed
    assert [item.type for item in listed(items, order="asc").data] == [
        "message", "message", "message", "function_call", "function_call_output"
    ]
    assert items_of(RESPONSE, given) == items  # the same ids every time


def test_pages_follow_order_limit_and_after() -> None:
    items = items_of(RESPONSE, [{"role": "user", "content": str(n)} for n in range(5)])
    ids = [item["id"] for item in items]
    newest = listed(items, limit=2)
    assert [item.id for item in newest.data] == [ids[4], ids[3]]  # the last first
    assert (newest.first_id, newest.last_id, newest.has_more) == (ids[4], ids[3], True)
    rest = listed(items, after=newest.last_id, limit=2)
    assert [item.id for item in rest.data] == [ids[2], ids[1]] and rest.has_more
    last = listed(items, after=ids[1], limit=2)
    assert [item.id for item in last.data] == [ids[0]] and not last.has_more
    oldest = listed(items, order="asc", limit=5)
    assert [item.id for item in oldest.data] == ids and not oldest.has_more
    assert json.loads(page(items, ids[4], 3, "asc")) == {
        "object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False
    }


def test_an_unknown_after_is_refused_naming_it() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        page(items_of(RESPONSE, "hi"), "msg_other", 20, "desc")
    assert (caught.value.status_code, caught.value.param) == (400, "after")


def test_paging_through_items_that_share_an_id_ends() -> None:
    sent = [{"role": "user", "content": str(n), **({"id": "msg_x"} if n % 2 == 0 else {})} for n in range(4)]
    items = items_of(RESPONSE, sent)
    seen, after = [], None
    for _ in range(10):  # the SDK's auto-paging: on while has_more
        listing = listed(items, after=after, limit=1, order="asc")
        seen += [item.id for item in listing.data]
        if not listing.has_more:
            break
        after = listing.last_id
    assert not listing.has_more and len(seen) <= len(items)
