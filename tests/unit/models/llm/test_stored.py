"""models/llm/stored.py: a replica's stored responses are its callers', and bounded."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gateway.errors import InvalidRequestError, ResponseNotFoundError
from gateway.protocol.engine import EngineRequest
from models.llm.stored import StoredResponses

REPLICA = "0123456789ab"


def create(request_id: str, owner: str = "", **body: object) -> EngineRequest:
    return EngineRequest("responses", {"model": "m", "input": "hi", **body}, request_id, "m", owner=owner)


def named(endpoint: str, response_id: str, owner: str = "") -> EngineRequest:
    return EngineRequest(endpoint, {"response_id": response_id}, "r", "m", owner=owner)  # type: ignore[arg-type]


def test_a_new_response_is_named_after_the_replica_and_kept_for_its_key() -> None:
    stored = StoredResponses(REPLICA, 10, forget=lambda _: None)
    admitted = stored.admit(create("req1", owner="team-a"))
    assert admitted.request_id == REPLICA + "req1"  # the engine's response id: resp_<replica><request>
    stored.ended(admitted)  # the engine stored it
    for endpoint in ("responses_retrieve", "responses_cancel"):
        stored.check(named(endpoint, f"resp_{REPLICA}req1", owner="team-a"))
        with pytest.raises(ResponseNotFoundError) as caught:  # another key: as if it did not exist
            stored.check(named(endpoint, f"resp_{REPLICA}req1", owner="team-b"))
        assert (caught.value.status_code, caught.value.param) == (404, "response_id")
    stored.admit(create("req2", owner="team-a", previous_response_id=f"resp_{REPLICA}req1"))
    with pytest.raises(ResponseNotFoundError) as caught:
        stored.admit(create("req3", owner="", previous_response_id=f"resp_{REPLICA}req1"))
    assert caught.value.param == "previous_response_id"
    assert len(stored) == 2  # req3 was refused before it was kept


def test_the_oldest_response_is_dropped_past_the_bound_and_then_unknown() -> None:
    dropped: list[str] = []
    stored = StoredResponses(REPLICA, 2, forget=dropped.append)
    for n in range(4):
        stored.ended(stored.admit(create(f"req{n}")))
    assert dropped == [f"resp_{REPLICA}req0", f"resp_{REPLICA}req1"]
    assert len(stored) == 2
    with pytest.raises(ResponseNotFoundError):
        stored.check(named("responses_retrieve", f"resp_{REPLICA}req0"))
    stored.check(named("responses_retrieve", f"resp_{REPLICA}req3"))


def test_past_the_bound_the_key_that_keeps_the_most_loses_its_oldest_not_another_keys() -> None:
    # One key's flood of cheap responses used to push out every other key's conversations.
    dropped: list[str] = []
    stored = StoredResponses(REPLICA, 4, forget=dropped.append)
    stored.ended(stored.admit(create("b0", owner="team-b")))  # the oldest of all
    for n in range(5):
        stored.ended(stored.admit(create(f"a{n}", owner="team-a")))
    assert dropped == [f"resp_{REPLICA}a0", f"resp_{REPLICA}a1"]
    stored.check(named("responses_retrieve", f"resp_{REPLICA}b0", owner="team-b"))  # still there
    stored.ended(stored.admit(create("b1", owner="team-b")))  # team-a still keeps the most: 3 to 2
    assert dropped[2:] == [f"resp_{REPLICA}a2"]


def test_keys_gone_quiet_lose_their_old_responses_to_an_active_keys_conversations() -> None:
    # Many keys that each stored a response long ago, then one key talking on:
    # its chained turns must find their previous responses.
    dropped: list[str] = []
    stored = StoredResponses(REPLICA, 10, forget=dropped.append)
    for n in range(10):
        stored.ended(stored.admit(create(f"old{n}", owner=f"key-{n}")))
    for n in range(20):
        stored.ended(stored.admit(create(f"turn{n}", owner="talker")))
    assert dropped[:5] == [f"resp_{REPLICA}old{n}" for n in range(5)]  # the oldest of all, until...
    assert len(stored) == 10
    for n in range(15, 20):  # ... the talker keeps half: past it, its own oldest go
        stored.check(named("responses_retrieve", f"resp_{REPLICA}turn{n}", owner="talker"))
    stored.check(named("responses_retrieve", f"resp_{REPLICA}old9", owner="key-9"))
    assert f"resp_{REPLICA}turn14" in dropped


def test_a_deleted_response_leaves_its_keys_count() -> None:
    dropped: list[str] = []
    stored = StoredResponses(REPLICA, 2, forget=dropped.append)
    for n in range(2):
        stored.ended(stored.admit(create(f"a{n}", owner="team-a")))
    stored.deleted(named("responses_delete", f"resp_{REPLICA}a0", owner="team-a"))
    stored.ended(stored.admit(create("b0", owner="team-b")))
    stored.ended(stored.admit(create("b1", owner="team-b")))  # 3 > 2: team-b keeps two, more than half
    assert dropped == [f"resp_{REPLICA}a0", f"resp_{REPLICA}b0"]


def test_requests_the_engine_refuses_never_drop_anothers_response() -> None:
    # A full store, then a flood of requests refused at once or at their first frame (no tokens spent).
    dropped: list[str] = []
    stored = StoredResponses(REPLICA, 2, forget=dropped.append)
    for n in range(2):
        stored.ended(stored.admit(create(f"kept{n}", owner="team-a")))
    for n in range(5):
        refused = stored.admit(create(f"bad{n}", owner="team-b"))
        with pytest.raises(ValueError), stored.unless_refused(refused):
            raise ValueError("refused")
        stored.ended(stored.admit(create(f"cut{n}", owner="team-b")), stored=False)  # refused at its first frame
    for n in range(2):
        stored.check(named("responses_retrieve", f"resp_{REPLICA}kept{n}", owner="team-a"))
    assert len(stored) == 2 and not any("kept" in response for response in dropped)
    with pytest.raises(ResponseNotFoundError):  # nor left behind, taking a place
        stored.check(named("responses_retrieve", f"resp_{REPLICA}cut0", owner="team-b"))


@pytest.mark.parametrize(
    "size, body", [(10, {"store": False}), (10, {"store": None}), (0, {})], ids=["store-false", "store-null", "keeps-none"]
)
def test_a_response_not_stored_is_not_kept(size: int, body: dict[str, object]) -> None:
    stored = StoredResponses(REPLICA, size, forget=lambda _: None)
    assert stored.admit(create("req1", **body)).request_id == REPLICA + "req1"
    assert len(stored) == 0
    with pytest.raises(ResponseNotFoundError):
        stored.check(named("responses_retrieve", f"resp_{REPLICA}req1"))


def test_other_endpoints_pass_unchanged() -> None:
    stored = StoredResponses(REPLICA, 10, forget=lambda _: None)
    chat = EngineRequest("chat", {"model": "m", "messages": []}, "req1", "m")
    assert stored.admit(chat) is chat


def test_a_deleted_response_is_forgotten_and_then_unknown_to_its_key() -> None:
    dropped: list[str] = []
    stored = StoredResponses(REPLICA, 10, forget=dropped.append)
    stored.admit(create("req1", owner="team-a"))
    stored.admit(create("req2", owner="team-a"))
    response_id = f"resp_{REPLICA}req1"
    with pytest.raises(ResponseNotFoundError):  # another key may not delete it
        stored.check(named("responses_delete", response_id, owner="team-b"))
    stored.deleted(named("responses_retrieve", response_id, owner="team-a"))  # not a deletion: kept
    assert (len(stored), dropped) == (2, [])
    delete = named("responses_delete", response_id, owner="team-a")
    stored.check(delete)
    stored.deleted(delete)
    assert (len(stored), dropped) == (1, [response_id])
    for endpoint in ("responses_retrieve", "responses_delete"):
        with pytest.raises(ResponseNotFoundError):
            stored.check(named(endpoint, response_id, owner="team-a"))
    with pytest.raises(ResponseNotFoundError) as caught:
        stored.admit(create("req3", owner="team-a", previous_response_id=response_id))
    assert caught.value.param == "previous_response_id"
    stored.deleted(delete)  # deleted twice: forgotten once
    assert dropped == [response_id]


def test_input_items_are_the_requests_own_input_for_its_key_only() -> None:
    stored = StoredResponses(REPLICA, 10, forget=lambda _: None)
    stored.admit(create("req1", owner="team-a", input=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]))
    response_id = f"resp_{REPLICA}req1"
    ask = EngineRequest(
        "responses_input_items", {"response_id": response_id, "limit": 1, "order": "asc"}, "r", "m", owner="team-a"
    )
    answer = json.loads(stored.input_items(ask))
    assert [item["content"][0]["text"] for item in answer["data"]] == ["one"] and answer["has_more"]
    with pytest.raises(ResponseNotFoundError):
        stored.admit(dataclasses.replace(ask, owner="team-b"))
    with pytest.raises(ResponseNotFoundError):
        stored.input_items(dataclasses.replace(ask, owner="team-b"))


def test_a_response_the_engine_refuses_is_not_kept_nor_its_input() -> None:
    dropped: list[str] = []
    stored = StoredResponses(REPLICA, 10, forget=dropped.append)
    refused = stored.admit(create("req1", input="word " * 100_000))  # refused as too long, say
    with pytest.raises(ValueError), stored.unless_refused(refused):
        raise ValueError("too long")
    assert (len(stored), dropped) == (0, [f"resp_{REPLICA}req1"])
    with pytest.raises(ResponseNotFoundError):
        stored.check(named("responses_retrieve", f"resp_{REPLICA}req1"))
    answered = stored.admit(create("req2"))
    with stored.unless_refused(answered):
        pass
    assert len(stored) == 1
    retrieve = stored.admit(named("responses_retrieve", f"resp_{REPLICA}req2"))
    with pytest.raises(ResponseNotFoundError), stored.unless_refused(retrieve):  # not a new response: kept
        raise ResponseNotFoundError("gone from the engine")
    assert len(stored) == 1


@pytest.mark.parametrize("again", [{}, {"store": False}], ids=["stored", "not-stored"])
def test_a_request_id_sent_again_never_takes_over_or_drops_anothers_response(again: dict[str, object]) -> None:
    # Two keys' clients both name their requests "1" (their own x-request-id).
    dropped: list[str] = []
    stored = StoredResponses(REPLICA, 10, forget=dropped.append)
    first = stored.admit(create("1", owner="team-a"))
    second = stored.admit(create("1", owner="team-b", **again))
    assert second.request_id != first.request_id and second.request_id.startswith(REPLICA + "1")
    with pytest.raises(ValueError), stored.unless_refused(second):  # the second is refused, say
        raise ValueError("too long")
    stored.check(named("responses_retrieve", f"resp_{first.request_id}", owner="team-a"))  # still team-a's
    assert f"resp_{first.request_id}" not in dropped


def test_a_request_id_in_flight_unstored_is_not_given_to_another_keys_response_its_end_would_drop() -> None:
    # team-b's request, not to be stored, is running under id "1" when team-a's, to be stored, comes with "1".
    dropped: list[str] = []
    stored = StoredResponses(REPLICA, 10, forget=dropped.append)
    unstored = stored.admit(create("1", owner="team-b", store=False))
    kept = stored.admit(create("1", owner="team-a", background=True))
    assert kept.request_id != unstored.request_id  # else one engine request id for two requests
    with pytest.raises(ConnectionError), stored.unless_refused(unstored):  # team-b's client leaves
        raise ConnectionError("client left")
    stored.check(named("responses_retrieve", f"resp_{kept.request_id}", owner="team-a"))  # still there
    assert f"resp_{kept.request_id}" not in dropped
    stored.ended(kept)
    again = stored.admit(create("1", owner="team-b", store=False))  # both over: the id is free again
    assert again.request_id == unstored.request_id


@pytest.mark.parametrize("store", [False, None])
def test_a_background_response_not_to_be_stored_is_refused_rather_than_never_found(store: object) -> None:
    # Its first poll, and any cancel, would be 404 while it generated on.
    stored = StoredResponses(REPLICA, 10, forget=lambda response_id: None)
    with pytest.raises(InvalidRequestError) as refused:
        stored.admit(create("1", background=True, store=store))
    assert refused.value.param == "store" and "background" in refused.value.message
    assert len(stored) == 0
    stored.admit(create("2", background=True))  # stored by default
    stored.admit(create("3", background=False, store=False))
    assert len(stored) == 1


def test_counting_input_tokens_after_a_response_needs_its_key_and_keeps_nothing() -> None:
    stored = StoredResponses(REPLICA, 10, forget=lambda _: None)
    stored.ended(stored.admit(create("req1", owner="team-a")))
    previous = {"model": "m", "input": "and?", "previous_response_id": f"resp_{REPLICA}req1"}
    count = EngineRequest("responses_input_tokens", previous, "c1", "m", owner="team-a")
    assert stored.admit(count) == count  # counted as sent
    with pytest.raises(ResponseNotFoundError) as caught:
        stored.admit(dataclasses.replace(count, owner="team-b"))
    assert caught.value.param == "previous_response_id"
    assert len(stored) == 1


def test_responses_still_generating_are_not_dropped_and_one_deleted_meanwhile_is_dropped_again() -> None:
    # The engine stores a response as its generation ends: one dropped before then would stay for good.
    dropped: list[str] = []
    stored = StoredResponses(REPLICA, 1, forget=dropped.append)
    long = stored.admit(create("long"))
    short = stored.admit(create("short"))
    stored.ended(short)  # "long" still generates: not the one dropped
    assert dropped == []
    stored.ended(long)  # now the oldest stored goes
    assert dropped == [f"resp_{REPLICA}short"]
    stored.check(named("responses_retrieve", f"resp_{REPLICA}long"))
    gone = stored.admit(create("gone"))
    stored.deleted(named("responses_delete", f"resp_{REPLICA}gone"))
    stored.ended(gone)
    assert dropped[-2:] == [f"resp_{REPLICA}gone"] * 2  # and again once the engine has stored it


def test_a_follow_up_on_a_response_still_generating_is_refused_saying_so() -> None:
    # vLLM stores a response only once it ends; it answered such a follow-up 404 naming `response_id`.
    stored = StoredResponses(REPLICA, 10, forget=lambda _: None)
    first = stored.admit(create("req1", owner="team-a"))
    follow_up = create("req2", owner="team-a", previous_response_id=f"resp_{REPLICA}req1")
    with pytest.raises(InvalidRequestError) as caught:
        stored.admit(follow_up)
    assert (caught.value.status_code, caught.value.param) == (400, "previous_response_id")
    assert "is still in progress" in caught.value.message
    stored.ended(first)
    stored.admit(follow_up)  # once stored, it continues


def test_cancelling_a_response_answered_at_once_while_it_generates_says_only_background_ones_can_be() -> None:
    # vLLM stores it only at its end, so it answered 404 (not found) until then.
    stored = StoredResponses(REPLICA, 10, forget=lambda _: None)
    at_once = stored.admit(create("req1", owner="team-a"))
    background = stored.admit(create("req2", owner="team-a", background=True))
    with pytest.raises(InvalidRequestError, match="Only a background response can be cancelled") as caught:
        stored.check(named("responses_cancel", f"resp_{REPLICA}req1", owner="team-a"))
    assert (caught.value.status_code, caught.value.param) == (400, "response_id")
    stored.check(named("responses_cancel", f"resp_{REPLICA}req2", owner="team-a"))  # the engine cancels it
    with pytest.raises(ResponseNotFoundError):  # another key's: as if it did not exist
        stored.check(named("responses_cancel", f"resp_{REPLICA}req1", owner="team-b"))
    stored.ended(at_once)
    stored.ended(background)
    stored.check(named("responses_cancel", f"resp_{REPLICA}req1", owner="team-a"))  # ended: the engine says why


def test_past_the_bound_on_kept_input_the_oldest_go_however_few_are_kept() -> None:
    # A multimodal model's images are tens of MB each: a thousand stored ones held tens of GB.
    dropped: list[str] = []
    stored = StoredResponses(REPLICA, 1000, forget=dropped.append, input_chars=200)
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64," + "A" * 20}]}]
    running = stored.admit(create("big"))  # still generating: never dropped
    for n in range(4):
        stored.ended(stored.admit(create(f"r{n}", input=image)))
    assert dropped == [f"resp_{REPLICA}r0", f"resp_{REPLICA}r1"]  # 81 characters each: two fit
    stored.check(named("responses_retrieve", f"resp_{REPLICA}r3"))
    stored.ended(stored.admit(create("r4", input=image)))
    assert dropped[2:] == [f"resp_{REPLICA}r2"]
    stored.deleted(named("responses_delete", f"resp_{REPLICA}r4"))  # room given back
    stored.ended(stored.admit(create("r5", input=image)))
    assert dropped[3:] == [f"resp_{REPLICA}r4"]  # (the delete's own forget), none for room
    stored.ended(running)
    stored.check(named("responses_retrieve", f"resp_{REPLICA}big"))


def test_an_input_nested_as_deep_as_json_allows_is_measured_without_recursion() -> None:
    # Python's parser takes bodies nested deeper than a recursive walk could measure (a 500, and the
    # response left running for ever); the engine refuses such an input itself, with a 400.
    nested: object = "x" * 10
    for _ in range(5000):
        nested = [{"content": nested}]
    stored = StoredResponses(REPLICA, 10, forget=lambda _: None)
    admitted = stored.admit(create("deep", input=nested))
    stored.ended(admitted, stored=False)
    assert len(stored) == 0 and stored._chars == 0 and not stored._running
