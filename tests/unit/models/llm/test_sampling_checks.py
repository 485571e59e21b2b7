"""Sampling fields out of vLLM's ranges, refused in OpenAI's words, on vLLM's own parsed requests."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequestError
from models.llm.sampling_checks import ANTHROPIC_RANGES, check_budget_fits, check_least_tokens, check_sampling


def _chat(**fields: Any) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def _completion(**fields: Any) -> Any:
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


@pytest.mark.parametrize("parse", [_chat, _completion])
@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("presence_penalty", -3, "decimal below minimum value. Expected a value >= -2, but got -3 instead."),
        ("frequency_penalty", 2.25, "decimal above maximum value. Expected a value <= 2, but got 2.25 instead."),
        ("temperature", -0.5, "decimal below minimum value. Expected a value >= 0, but got -0.5 instead."),
        ("top_p", 0, "decimal below minimum value. Expected a value > 0, but got 0 instead."),
        ("top_p", 1.01, "decimal above maximum value. Expected a value <= 1, but got 1.01 instead."),
        ("min_p", -0.1, "decimal below minimum value. Expected a value >= 0, but got -0.1 instead."),
        ("repetition_penalty", -1, "decimal below minimum value. Expected a value > 0, but got -1 instead."),
        ("top_k", -5, "integer below minimum value. Expected a value >= -1, but got -5 instead."),
        ("min_tokens", -1, "integer below minimum value. Expected a value >= 0, but got -1 instead."),
    ],
)
def test_a_field_out_of_range_is_refused_naming_it(parse: Any, field: str, value: float, words: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_sampling(parse(**{field: value}), budget=16)
    assert (caught.value.param, caught.value.message) == (field, f"Invalid '{field}': {words}")
    assert caught.value.status_code == 400
    # OpenAI's code for its words: "integer below minimum value" is integer_below_min_value.
    kind = words.split(".")[0].replace("minimum", "min").replace("maximum", "max")
    assert caught.value.code == kind.replace(" ", "_")


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"presence_penalty": -2, "frequency_penalty": 2, "temperature": 0, "top_p": 1, "min_p": 0},
        {"temperature": 2.0, "top_k": -1, "repetition_penalty": 1.3, "min_tokens": 16},
        {"top_k": 0, "min_p": 1, "min_tokens": 0},
    ],
)
def test_values_at_or_inside_the_bounds_pass(fields: dict[str, Any]) -> None:
    check_sampling(_chat(**fields), budget=16)


def test_min_tokens_above_the_output_budget_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_sampling(_completion(min_tokens=9, max_tokens=8), budget=8)
    assert caught.value.param == "min_tokens"
    assert "Expected a value <= 8, but got 9 instead" in caught.value.message
    check_sampling(_completion(min_tokens=9), budget=None)  # the window's rest: checked once rendered


def test_min_tokens_above_the_window_rest_is_refused_naming_it() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_least_tokens(_chat(min_tokens=2040), budget=2034)
    assert (caught.value.param, caught.value.code) == ("min_tokens", "integer_above_max_value")
    assert caught.value.message.startswith(
        "Invalid 'min_tokens': integer above maximum value. Expected a value <= 2034, but got 2040 instead."
    )
    check_least_tokens(_chat(min_tokens=2034), budget=2034)
    check_least_tokens(_chat(), budget=0)


@pytest.mark.parametrize("parse", [_chat, _completion])
def test_several_choices_at_a_greedy_temperature_are_refused_naming_n(parse: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_sampling(parse(n=3, temperature=0), budget=None)
    assert caught.value.param == "n"
    assert caught.value.message.startswith("Invalid 'n': 3 choices were asked for at temperature 0,")
    check_sampling(parse(n=3, temperature=0.7), budget=None)
    check_sampling(parse(n=1, temperature=0), budget=None)
    # vLLM raises a temperature in (0, 0.01) to 0.01 and samples: only 0 is greedy there.
    check_sampling(parse(n=2, temperature=0.000001), budget=None)
    check_sampling(parse(n=2, temperature=0.009), budget=None)
    check_sampling(parse(n=3), budget=None)  # the model's default temperature: vLLM's to judge
    check_sampling(parse(n=3, temperature=0, use_beam_search=True), budget=None)  # beam search makes n


@pytest.mark.parametrize(
    ("field", "output"),
    [("max_tokens", "completion"), ("max_completion_tokens", "completion"), ("max_output_tokens", "output")],
)
def test_an_output_budget_beyond_the_window_is_refused_naming_the_field_sent(field: str, output: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_budget_fits(field, 5000, most=2048)
    assert (caught.value.param, caught.value.code, caught.value.status_code) == (field, "invalid_value", 400)
    assert caught.value.message == (
        f"{field} is too large: 5000. This model supports at most 2048 {output} tokens, whereas you provided 5000."
    )


def test_an_output_budget_within_the_window_or_unset_passes() -> None:
    check_budget_fits("max_tokens", 2048, most=2048)  # the prompt's share is checked once it is rendered
    check_budget_fits("max_tokens", None, most=2048)


def test_a_number_that_is_not_finite_is_refused() -> None:
    request = _chat()
    request.presence_penalty = float("nan")
    with pytest.raises(InvalidRequestError) as caught:
        check_sampling(request, budget=None)
    assert caught.value.param == "presence_penalty" and "finite" in caught.value.message


@pytest.mark.parametrize("parse", [_chat, _completion])
@pytest.mark.parametrize(
    ("field", "value", "where"),
    [("stop", "", "stop"), ("stop", ["end", ""], "stop[1]"), ("bad_words", [""], "bad_words[0]")],
)
def test_an_empty_stop_or_bad_word_is_refused_naming_its_path(parse: Any, field: str, value: Any, where: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_sampling(parse(**{field: value}), budget=16)
    expected = (
        f"Invalid '{where}': string too short. Expected a string with minimum length 1, "
        "but got an empty string instead."
    )
    assert (caught.value.param, caught.value.message) == (where, expected)


@pytest.mark.parametrize("fields", [{"stop": "end"}, {"stop": ["a", "b"], "bad_words": ["x"]}, {"stop": None}])
def test_stop_strings_and_bad_words_with_text_pass(fields: dict[str, Any]) -> None:
    check_sampling(_completion(**fields), budget=16)


def _message(**fields: Any) -> Any:
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest

    return AnthropicMessagesRequest.model_validate(
        {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_a_messages_temperature_is_bounded_as_anthropic_bounds_it() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_sampling(_message(temperature=3), budget=4, ranges=ANTHROPIC_RANGES)
    assert caught.value.param == "temperature"
    assert caught.value.message == (
        "Invalid 'temperature': decimal above maximum value. Expected a value <= 1, but got 3 instead."
    )
    with pytest.raises(InvalidRequestError):
        check_sampling(_message(temperature=1.5), budget=4, ranges=ANTHROPIC_RANGES)
    check_sampling(_message(temperature=1), budget=4, ranges=ANTHROPIC_RANGES)
    check_sampling(_chat(temperature=1.5), budget=4)  # OpenAI's range is vLLM's, up to 2


def test_a_messages_top_k_is_at_least_0_as_anthropic_bounds_it() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_sampling(_message(top_k=-1), budget=4, ranges=ANTHROPIC_RANGES)
    assert caught.value.param == "top_k"
    check_sampling(_message(top_k=0), budget=4, ranges=ANTHROPIC_RANGES)
    check_sampling(_chat(top_k=-1), budget=4)  # vLLM's "off", an OpenAI-side extra


def test_an_empty_stop_sequence_is_named_by_its_own_path() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_sampling(_message(stop_sequences=["end", ""]), budget=4, ranges=ANTHROPIC_RANGES)
    assert caught.value.param == "stop_sequences[1]"
    assert caught.value.message.startswith("Invalid 'stop_sequences[1]': string too short.")
    check_sampling(_message(stop_sequences=["end"]), budget=4, ranges=ANTHROPIC_RANGES)
