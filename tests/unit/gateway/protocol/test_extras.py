"""gateway/protocol/extras.py: a field vLLM would drop is refused, naming it,
unless it cannot change the answer; checked against vLLM's own schemas and the
official SDKs' parameters, so an upgrade of either that adds one fails here."""

from __future__ import annotations

from typing import Any

import pytest
from anthropic.types import message_count_tokens_params, message_create_params
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from openai.types.responses import input_token_count_params, response_create_params

from gateway.errors import InvalidRequestError
from gateway.protocol.extras import HINTS, REMOVED, UNSUPPORTED, check_fields, check_openai_metadata, counted_fields
from models.llm.vllm_engine import _known_fields


def vllm_schemas() -> dict[str, type]:
    from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return {
        "chat": ChatCompletionRequest, "completion": CompletionRequest, "responses": ResponsesRequest,
        "messages": AnthropicMessagesRequest, "messages_count": AnthropicCountTokensRequest,
        "responses_input_tokens": ResponsesRequest,
    }


SDK_PARAMS: dict[str, set[str]] = {
    "chat": set(chat_create_params.CompletionCreateParamsBase.__annotations__),
    "completion": set(completion_create_params.CompletionCreateParamsBase.__annotations__),
    "responses": set(response_create_params.ResponseCreateParamsBase.__annotations__),
    "messages": set(message_create_params.MessageCreateParamsBase.__annotations__),
    "messages_count": set(message_count_tokens_params.MessageCountTokensParams.__annotations__),
    "responses_input_tokens": set(input_token_count_params.InputTokenCountParams.__annotations__),
}


@pytest.mark.parametrize("endpoint", sorted(SDK_PARAMS))
def test_every_sdk_parameter_is_served_hinted_or_refused_by_name(endpoint: str) -> None:
    known = counted_fields(endpoint, _known_fields(vllm_schemas()[endpoint]))
    decided = set(HINTS.get(endpoint, {})) | set(UNSUPPORTED.get(endpoint, {}))
    assert SDK_PARAMS[endpoint] - known - decided == set()  # a new one: decide what it means here
    assert decided & known == set()  # vLLM learnt one: its schema serves it now
    assert decided <= SDK_PARAMS[endpoint]
    assert set(REMOVED) & known == set()


CHAT_KNOWN = frozenset({"model", "messages", "max_tokens", "temperature", "top_k"})
HELLO: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("typo", ["max_token", "temprature", "top-k"])
def test_a_misspelt_field_is_refused_by_name(typo: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_fields("chat", {**HELLO, typo: 1}, CHAT_KNOWN)
    error = refused.value
    assert (error.status_code, error.param, error.code) == (400, typo, None)
    assert error.message == f"Unrecognized request argument supplied: {typo}"


@pytest.mark.parametrize("endpoint", ["responses", "responses_input_tokens"])
def test_an_unknown_responses_field_is_refused_in_the_responses_apis_words(endpoint: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_fields(endpoint, {"model": "m", "input": "hi", "foo": 1}, {"model", "input"})
    error = refused.value
    assert (error.status_code, error.param, error.code) == (400, "foo", "unknown_parameter")
    assert error.message == "Unknown parameter: 'foo'."


@pytest.mark.parametrize("endpoint", ["messages", "messages_count"])
def test_an_unknown_messages_field_is_refused_in_anthropics_words(endpoint: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_fields(endpoint, {**HELLO, "max_token": 4}, CHAT_KNOWN)
    error = refused.value
    assert (error.status_code, error.param, error.code) == (400, "max_token", None)
    assert error.message == "max_token: Extra inputs are not permitted"


def test_a_removed_vllm_field_says_what_replaces_it() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_fields("chat", {**HELLO, "guided_json": {"type": "object"}}, CHAT_KNOWN)
    assert (refused.value.param, refused.value.code) == ("guided_json", "unsupported_parameter")
    assert "response_format" in refused.value.message and "unconstrained" in refused.value.message


@pytest.mark.parametrize(
    ("endpoint", "field", "value"),
    [
        ("chat", "audio", {"voice": "alloy", "format": "wav"}),
        ("chat", "functions", [{"name": "f", "parameters": {}}]),
        ("chat", "modalities", ["text", "audio"]),
        ("chat", "store", True),
        ("chat", "verbosity", "low"),
        ("completion", "best_of", 2),
        ("responses", "conversation", "conv_1"),
        ("messages", "container", "c_1"),
    ],
)
def test_what_the_engine_does_not_do_is_refused_not_dropped(endpoint: str, field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_fields(endpoint, {**HELLO, field: value}, CHAT_KNOWN)
    assert (refused.value.param, refused.value.code) == (field, "unsupported_parameter")
    assert refused.value.message.startswith(f"Unsupported parameter: '{field}'")


@pytest.mark.parametrize(
    ("endpoint", "fields"),
    [
        ("chat", {"audio": None, "functions": None, "function_call": None, "web_search_options": None,
                  "verbosity": None, "guided_json": None}),
        ("completion", {"best_of": None, "guided_regex": None}),
        ("completion", {"best_of": 1}),
        ("completion", {"best_of": 3, "n": 3}),
        ("responses", {"conversation": None}),
    ],
)
def test_null_for_what_the_engine_does_not_do_asks_for_nothing_and_passes(
    endpoint: str, fields: dict[str, Any]
) -> None:
    # As OpenAI takes it: clients that send every field send the unset ones as null.
    check_fields(endpoint, {**HELLO, **fields}, CHAT_KNOWN | {"n"})


@pytest.mark.parametrize(
    "fields", [{"best_of": 2}, {"best_of": 3, "n": 2}, {"best_of": True}, {"best_of": 2, "n": None}]
)
def test_best_of_picking_among_more_answers_than_it_returns_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_fields("completion", {**HELLO, **fields}, CHAT_KNOWN | {"n"})
    assert (refused.value.param, refused.value.code) == ("best_of", "unsupported_parameter")


@pytest.mark.parametrize("fields", [{"best_of": 1, "n": 2}, {"best_of": 2, "n": 5}])
def test_best_of_below_n_is_refused_as_openai_words_it(fields: dict[str, Any]) -> None:
    # It was refused as if it asked for more answers than returned (the opposite).
    with pytest.raises(InvalidRequestError, match="best_of must be greater than or equal to n") as refused:
        check_fields("completion", {**HELLO, **fields}, CHAT_KNOWN | {"n"})
    assert (refused.value.param, refused.value.code) == ("best_of", "invalid_value")


@pytest.mark.parametrize("endpoint", ["chat", "completion", "responses", "messages"])
@pytest.mark.parametrize(
    ("field", "value"),
    [("kv_transfer_params", {"prompt_token_ids": [1, 2, 3]}), ("ec_transfer_params", {"do_remote_decode": True})],
)
def test_vllms_disaggregated_serving_fields_are_refused_though_its_schemas_know_them(
    endpoint: str, field: str, value: Any
) -> None:
    # With kv_transfer_params.prompt_token_ids vLLM generated from those ids and ignored the messages.
    known = _known_fields(vllm_schemas()[endpoint])
    assert field in known
    with pytest.raises(InvalidRequestError) as refused:
        check_fields(endpoint, {"model": "m", field: value}, known)
    assert (refused.value.param, refused.value.code) == (field, "unsupported_parameter")
    check_fields(endpoint, {"model": "m", field: None}, known)  # null: asks for nothing


def test_disaggregated_serving_fields_where_the_schema_lacks_them_are_unknown_fields() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_fields("messages_count", {"model": "m", "kv_transfer_params": None}, frozenset({"model"}))
    assert refused.value.message == "kv_transfer_params: Extra inputs are not permitted"


def test_null_for_a_field_no_api_has_is_still_refused() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_fields("chat", {**HELLO, "max_token": None}, CHAT_KNOWN)
    assert refused.value.param == "max_token"


@pytest.mark.parametrize(
    ("endpoint", "fields"),
    [
        ("chat", {"metadata": {"team": "a"}, "prompt_cache_key": "k", "service_tier": "auto",
                  "safety_identifier": "u1", "store": False, "modalities": ["text"],
                  "prediction": {"type": "content", "content": "x"}, "verbosity": "medium"}),
        ("responses", {"safety_identifier": "u1", "stream_options": {"include_obfuscation": False}}),
        ("messages", {"cache_control": {"type": "ephemeral"}, "service_tier": "auto"}),
    ],
)
def test_hints_that_cannot_change_the_answer_are_taken(endpoint: str, fields: dict[str, Any]) -> None:
    check_fields(endpoint, {**HELLO, **fields}, CHAT_KNOWN)


def test_the_schemas_own_fields_and_aliases_pass() -> None:
    check_fields("chat", {**HELLO, "max_tokens": 3, "top_k": 5}, CHAT_KNOWN)
    assert "max_tokens" in _known_fields(vllm_schemas()["messages"])


def test_counting_input_tokens_takes_only_what_changes_the_prompt() -> None:
    known = counted_fields("responses_input_tokens", _known_fields(vllm_schemas()["responses"]))
    assert {"input", "instructions", "previous_response_id", "tools", "chat_template_kwargs"} <= known
    for field in ("max_output_tokens", "temperature", "stream", "store", "background"):  # shape only the answer
        assert field not in known
        with pytest.raises(InvalidRequestError) as refused:
            check_fields("responses_input_tokens", {"model": "m", "input": "hi", field: 1}, known)
        assert refused.value.param == field
    assert counted_fields("responses", frozenset({"stream"})) == {"stream"}


def test_openai_metadata_is_bounded_on_chat_and_responses_but_not_anthropics() -> None:
    many = {"metadata": {f"k{i}": "v" for i in range(17)}}
    for endpoint in ("chat", "responses"):
        with pytest.raises(InvalidRequestError) as refused:
            check_openai_metadata(endpoint, many)
        assert (refused.value.param, refused.value.code) == ("metadata", "object_above_max_properties")
    check_openai_metadata("messages", {"metadata": {"user_id": "u" * 600}})  # Anthropic's own field
