"""gateway/protocol/envelope.py: the routing fields the ingress reads."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gateway.protocol.envelope import MessagesEnvelope, RequestEnvelope, ResponsesEnvelope


def _locs(info: pytest.ExceptionInfo[ValidationError]) -> list[tuple[Any, ...]]:
    return [tuple(e["loc"]) for e in info.value.errors()]


def test_minimal_body() -> None:
    envelope = RequestEnvelope.of({"model": "echo"})

    assert envelope.model == "echo"
    assert envelope.stream is False
    assert envelope.stream_options is None


@pytest.mark.parametrize("body", [{}, {"model": ""}, {"model": None}, {"messages": []}])
def test_model_is_required(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        RequestEnvelope.of(body)

    assert _locs(info) == [("model",)]


@pytest.mark.parametrize("value", ["true", 1, "yes"])
def test_stream_must_be_a_real_bool(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        RequestEnvelope.of({"model": "echo", "stream": value})

    assert _locs(info) == [("stream",)]


def test_stream_true_with_options() -> None:
    envelope = RequestEnvelope.of(
        {"model": "echo", "stream": True, "stream_options": {"include_usage": True}}
    )

    assert envelope.stream is True
    assert envelope.stream_options is not None
    assert envelope.stream_options.include_usage is True


@pytest.mark.parametrize("stream", [False, None, "absent"])
def test_stream_options_without_stream_rejected(stream: object) -> None:
    body: dict[str, Any] = {"model": "echo", "stream_options": {"include_usage": True}}
    if stream != "absent":
        body["stream"] = stream

    with pytest.raises(ValidationError, match="`stream_options` can only be set when `stream` is true"):
        RequestEnvelope.of(body)


def test_stream_options_flags_must_be_real_bools() -> None:
    with pytest.raises(ValidationError) as info:
        RequestEnvelope.of({"model": "echo", "stream": True, "stream_options": {"include_usage": "yes"}})

    assert _locs(info) == [("stream_options", "include_usage")]


def test_other_fields_are_ignored() -> None:
    envelope = RequestEnvelope.of(
        {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": 9, "user": "u1"}
    )

    assert envelope.user == "u1"
    assert "messages" not in envelope.model_dump()
    assert "temperature" not in envelope.model_dump()


def test_anthropics_metadata_holds_its_user_id_and_nothing_else() -> None:
    body = {"model": "m", "max_tokens": 4, "messages": []}
    assert MessagesEnvelope.model_validate({**body, "metadata": {"user_id": "u-42"}}).user == "u-42"
    with pytest.raises(ValidationError) as info:  # a misspelt user_id: not a request without its cohort
        MessagesEnvelope.model_validate({**body, "metadata": {"userId": "u-42"}})
    assert _locs(info) == [("metadata", "userId")]


@pytest.mark.parametrize("field", ["background", "store"])
@pytest.mark.parametrize("value", [1, "true", "yes", 0])
def test_a_responses_background_or_store_is_true_or_false(field: str, value: object) -> None:
    # vLLM reads 1 or "yes" as true: the gateway, which decides by them how it answers and what it keeps, did not.
    with pytest.raises(ValidationError) as info:
        ResponsesEnvelope.of({"model": "m", field: value})
    assert _locs(info) == [(field,)]
    for kept in (True, False, None):
        assert getattr(ResponsesEnvelope.of({"model": "m", field: kept}), field) is kept


def test_a_responses_stream_takes_openais_stream_options_only() -> None:
    hinted = ResponsesEnvelope.of({"model": "m", "stream": True, "stream_options": {"include_obfuscation": False}})
    assert hinted.stream_options is not None and hinted.stream_options.include_obfuscation is False
    with pytest.raises(ValidationError) as info:  # chat's: every Responses stream ends with its usage
        ResponsesEnvelope.of({"model": "m", "stream": True, "stream_options": {"include_usage": True}})
    assert _locs(info) == [("stream_options", "include_usage")]
    with pytest.raises(ValidationError, match="`stream_options` can only be set when `stream` is true"):
        ResponsesEnvelope.of({"model": "m", "stream_options": {"include_obfuscation": True}})
    with pytest.raises(ValidationError) as info:
        ResponsesEnvelope.of({"model": "m", "stream": True, "stream_options": 5})
    assert _locs(info) == [("stream_options",)]
