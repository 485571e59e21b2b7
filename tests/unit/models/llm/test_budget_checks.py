"""models/llm/budget_checks.py: each refusal names the field the client sent."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.errors import ContextLengthExceededError, InvalidRequestError
from models.llm import budget_checks


def _chat(**fields: object) -> SimpleNamespace:
    return SimpleNamespace(**{"max_tokens": None, "max_completion_tokens": None, "logprobs": False, **fields})


def test_the_budget_field_is_the_one_the_client_named() -> None:
    assert budget_checks.budget_field("chat", _chat(max_tokens=5, max_completion_tokens=7)) == (
        "max_completion_tokens", 7,
    )
    assert budget_checks.budget_field("chat", _chat(max_tokens=5)) == ("max_tokens", 5)
    assert budget_checks.budget("responses", SimpleNamespace(max_output_tokens=9)) == 9
    assert budget_checks.budget("chat", _chat()) is None


def test_a_budget_under_one_token_is_refused_naming_its_field() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        budget_checks.check_budget("chat", _chat(max_completion_tokens=0))
    assert (caught.value.param, caught.value.code) == ("max_completion_tokens", "integer_below_min_value")
    assert "got 0" in caught.value.message


def test_an_echoed_completion_may_generate_no_token() -> None:
    budget_checks.check_budget("completion", _chat(max_tokens=0, echo=True))
    with pytest.raises(InvalidRequestError):
        budget_checks.check_budget("completion", _chat(max_tokens=0, echo=False))


@pytest.mark.parametrize("asked, refused", [(-1, True), (20, True), (5, False)])
def test_logprobs_beyond_what_the_engine_returns_are_refused(asked: int, refused: bool) -> None:
    request = _chat(logprobs=True, top_logprobs=asked)
    if not refused:
        budget_checks.check_logprobs("chat", request, 5)
        return
    with pytest.raises(InvalidRequestError) as caught:
        budget_checks.check_logprobs("chat", request, 5)
    assert caught.value.param == "top_logprobs"
    assert caught.value.code == (None if asked == -1 else "integer_above_max_value")


def test_logprobs_are_not_bounded_where_the_engine_returns_any_number() -> None:
    budget_checks.check_logprobs("completion", SimpleNamespace(logprobs=1000), -1)


def test_prompt_and_budget_beyond_the_window_name_the_prompt_field() -> None:
    budget_checks.check_window(10, 6, 16, "input")
    with pytest.raises(ContextLengthExceededError) as caught:
        budget_checks.check_window(10, 7, 16, "input")
    assert caught.value.param == "input"
    assert "17 tokens (10 in the input, 7 in the output)" in caught.value.message


def test_a_prompt_filling_the_window_with_no_budget_sent_is_context_length_exceeded() -> None:
    # vLLM's own words named max_tokens, a field the client never sent.
    budget_checks.check_window(15, None, 16, "messages")
    with pytest.raises(ContextLengthExceededError) as caught:
        budget_checks.check_window(16, None, 16, "messages")
    assert caught.value.param == "messages"
    assert "your messages has 16 tokens, leaving none to generate" in caught.value.message


@pytest.mark.parametrize(
    ("endpoint", "request_", "field"),
    [
        ("messages", SimpleNamespace(thinking=SimpleNamespace(type="enabled", budget_tokens=1024)), "thinking"),
        ("chat", _chat(thinking_token_budget=8), "thinking_token_budget"),
        ("completion", SimpleNamespace(thinking_token_budget=0), "thinking_token_budget"),
    ],
)
def test_a_thinking_budget_asked_of_a_model_without_a_reasoning_parser_is_refused_naming_its_field(
    endpoint: str, request_: SimpleNamespace, field: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        budget_checks.check_thinking(endpoint, request_, "tiny", budgets_thinking=False)
    assert (caught.value.param, caught.value.code) == (field, "unsupported_parameter")
    assert "`tiny` is not set up to keep a thinking budget" in caught.value.message
    assert "reasoning-parser" in caught.value.message and "--" not in caught.value.message  # no command line
    budget_checks.check_thinking(endpoint, request_, "tiny", budgets_thinking=True)


@pytest.mark.parametrize(
    ("endpoint", "request_"),
    [
        ("messages", SimpleNamespace(thinking=None)),
        ("messages", SimpleNamespace(thinking=SimpleNamespace(type="adaptive"))),
        ("messages", SimpleNamespace(thinking=SimpleNamespace(type="disabled"))),
        ("chat", _chat(thinking_token_budget=None)),
        ("responses", SimpleNamespace(max_output_tokens=4)),
    ],
)
def test_no_budget_asked_passes_without_a_reasoning_parser(endpoint: str, request_: SimpleNamespace) -> None:
    budget_checks.check_thinking(endpoint, request_, "tiny", budgets_thinking=False)


def test_an_engine_keeps_a_thinking_budget_once_a_reasoning_parser_set_up_its_reasoning_config() -> None:
    from models.llm import vllm_compat

    def serving(reasoning_config: object) -> vllm_compat.Serving:
        engine = SimpleNamespace(vllm_config=SimpleNamespace(reasoning_config=reasoning_config))
        return vllm_compat.Serving(engine=engine, model_config=None, max_model_len=64)

    assert vllm_compat.budgets_thinking(serving(SimpleNamespace(enabled=True)))
    assert not vllm_compat.budgets_thinking(serving(SimpleNamespace(enabled=False)))  # no think tokens found
    assert not vllm_compat.budgets_thinking(serving(None))

