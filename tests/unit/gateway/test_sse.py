"""gateway/sse.py: the exact bytes OpenAI clients parse."""

from __future__ import annotations

import json
import random

import pytest

from gateway import sse
from gateway.errors import OverloadedError, ServiceUnavailableError


def test_frame_is_compact_json_data_line() -> None:
    payload = {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "h\u00e9"}}]}

    assert sse.frame(payload) == (
        b'data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"h\\u00e9"}}]}\n\n'
    )


def test_frame_bytes_exactly() -> None:
    assert sse.frame({"a": 1, "b": [None, True, "x y"]}) == b'data: {"a":1,"b":[null,true,"x y"]}\n\n'


def test_done_frame_bytes() -> None:
    assert sse.DONE == b"data: [DONE]\n\n"
    assert sse.MEDIA_TYPE == "text/event-stream; charset=utf-8"  # as OpenAI sends it


def test_error_frames_are_error_then_done() -> None:
    envelope = OverloadedError("busy").to_dict()

    assert sse.error_frames(envelope) == sse.frame(envelope) + b"data: [DONE]\n\n"


def test_parse_round_trips_frames_and_done() -> None:
    chunks = [{"id": "1", "choices": []}, {"text": "line\n\nbreak"}, {"usage": {"total_tokens": 3}}]
    stream = b"".join(sse.frame(c) for c in chunks) + sse.DONE

    assert sse.parse(stream) == [*chunks, None]


def test_parse_of_error_frames() -> None:
    envelope = OverloadedError("busy").to_dict()

    assert sse.parse(sse.error_frames(envelope)) == [envelope, None]


def test_parse_of_empty_stream() -> None:
    assert sse.parse(b"") == []


@pytest.mark.parametrize(
    "stream",
    [
        b"event: ping\n\n",
        b": keep-alive comment\n\n",
        b'data:{"a":1}\n\n',
        sse.frame({"a": 1}) + b"garbage\n\n",
    ],
)
def test_parse_rejects_non_data_blocks(stream: bytes) -> None:
    with pytest.raises(ValueError, match="not an SSE data frame"):
        sse.parse(stream)


def test_each_api_ends_a_stream_with_its_own_error() -> None:
    from gateway.errors import OverloadedError

    error = OverloadedError("busy")
    assert sse.stream_error("chat", error) == sse.error_frames(error.to_dict())
    assert sse.stream_error("responses", error).startswith(b'event: error\ndata: {"type":"error","code":"overloaded"')
    assert sse.stream_error("messages", error) == (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n'
    )


def test_an_ingress_error_event_is_numbered_after_the_last_event_sent() -> None:
    sent = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":41,"delta":"a"}\n\n'
    assert sse.next_sequence_number(sent) == 42
    assert sse.next_sequence_number(b'{"sequence_number": 7}') == 8
    assert sse.next_sequence_number(b"partial bytes") is None
    assert sse.next_sequence_number(b'"sequence_number":') is None



def test_an_error_event_is_numbered_after_the_last_whole_number_where_a_read_cut_one() -> None:
    # A read may end anywhere: inside the digits of the latest event's number, or just before them.
    first = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":122}\n\n'
    second = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":123}\n\n'
    sent = first + second
    cut_inside = sent[: len(first) + second.index(b"123") + 2]  # ..."sequence_number":12
    cut_before = sent[: len(first) + second.index(b"123")]  # ..."sequence_number":
    assert sse.next_sequence_number(cut_inside) == 123  # not 13
    assert sse.next_sequence_number(cut_before) == 123
    assert sse.next_sequence_number(sent) == 124


def test_an_error_after_a_frame_cut_short_is_an_event_of_its_own() -> None:
    error = ServiceUnavailableError("The model stopped while serving the request.")
    whole, cut = sse.frame({"n": 1}), sse.frame({"n": 2})[:9]  # the replica stopped inside the second frame
    assert sse.stream_error_after("chat", error, whole) == sse.error_frames(error.to_dict())
    assert sse.stream_error_after("chat", error, b"") == sse.error_frames(error.to_dict())
    after_cut = sse.stream_error_after("chat", error, whole + cut)
    # A client's SSE parser reads the cut frame as one (undecodable) event, then the error and [DONE].
    events = (whole + cut + after_cut).split(b"\n\n")
    assert events[1] == cut and json.loads(events[2].removeprefix(b"data: "))["error"]["code"] == "service_unavailable"
    assert events[3] == b"data: [DONE]"
    sent = b'event: response.output_text.delta\ndata: {"sequence_number":41,"delta":"a'
    assert b'"sequence_number":42' in sse.stream_error_after("responses", error, sent)


def test_a_stored_responses_replayed_stream_ends_with_the_responses_error_event() -> None:
    error = OverloadedError("busy")
    assert sse.stream_error("responses_retrieve", error, 7) == sse.stream_error("responses", error, 7)
    assert sse.stream_error("responses_retrieve", error, 7).startswith(b"event: error\n")


EVENTS = (
    sse.frame({"n": 1, "text": "a"})
    + sse.event("content_block_delta", {"index": 0, "delta": {"text": "bc"}})
    + b": comment\n\n"
    + sse.frame({"n": 2, "text": "x" * 40})
    + sse.DONE
)


@pytest.mark.parametrize("seed", range(20))
def test_whole_events_pass_on_each_event_whole_wherever_reads_cut_them(seed: int) -> None:
    pieces = random.Random(seed)
    events, passed, at = sse.WholeEvents(), [], 0
    while at < len(EVENTS):
        size = pieces.randint(1, 9)
        if whole := events.take(EVENTS[at : at + size]):
            passed.append(whole)
        at += size
        assert b"".join(passed) + b"".join(events._held) == EVENTS[:at]  # nothing lost, nothing repeated
    assert all(whole.endswith(b"\n\n") for whole in passed)
    assert b"".join(passed) == EVENTS and events.rest() == b""


def test_whole_events_join_a_boundary_split_between_two_reads() -> None:
    events = sse.WholeEvents()
    assert events.take(b'data: {"n":1}\n') == b""
    assert events.take(b'\ndata: {"n"') == b'data: {"n":1}\n\n'
    assert events.take(b":2}") == b""
    assert events.rest() == b'data: {"n":2}' and events.rest() == b""


def test_whole_events_pass_reads_that_end_an_event_as_they_are() -> None:
    events = sse.WholeEvents()
    read = sse.frame({"n": 1}) + sse.frame({"n": 2})
    assert events.take(read) is read
    assert events.take(b"") == b"" and events.rest() == b""
