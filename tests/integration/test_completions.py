"""Legacy completions through the gateway with the official OpenAI SDK."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import VLLM_MODEL


@pytest.mark.parametrize("stream", [False, True])
def test_single_prompt(client: openai.OpenAI, stream: bool) -> None:
    kwargs = dict(model=VLLM_MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finishes) == 1
    else:
        response = client.completions.create(**kwargs)
        assert response.object == "text_completion"
        assert response.model == VLLM_MODEL
        text = response.choices[0].text
    whole = client.completions.create(**kwargs).choices[0].text
    assert text == whole
    assert text


@pytest.mark.parametrize("model", [VLLM_MODEL, "echo"])
def test_batched_prompts_answer_each_in_order(client: openai.OpenAI, model: str) -> None:
    # Each choice shows which prompt it answered (vLLM echoes it; the echo
    # engine answers with it). Comparing texts with single-prompt answers would
    # assume batch-invariant floating point, which vLLM does not promise.
    prompts = ["The market opened", "Water boils at", "The library was"]
    kwargs = dict(model=model, max_tokens=4, echo=True, extra_body={"ignore_eos": True})
    response = client.completions.create(prompt=prompts, **kwargs)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text[: len(p)] for c, p in zip(response.choices, prompts)] == prompts
    singles = [client.completions.create(prompt=p, **kwargs).usage for p in prompts]
    assert response.usage.prompt_tokens == sum(u.prompt_tokens for u in singles)
    assert response.usage.completion_tokens == sum(u.completion_tokens for u in singles)


def test_logprobs_and_echo(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=VLLM_MODEL, prompt="The gateway", max_tokens=3, logprobs=2, echo=True,
        extra_body={"ignore_eos": True},
    )
    choice = response.choices[0]
    assert choice.text.startswith("The gateway")
    assert choice.logprobs is not None
    generated = choice.logprobs.tokens[-3:]
    assert len(generated) == 3
    assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs[-3:])


@pytest.mark.parametrize("stream", [False, True])
def test_an_echoed_prompt_is_scored_without_generating(client: openai.OpenAI, stream: bool) -> None:
    """echo with max_tokens 0: the prompt's own logprobs, nothing generated
    (how evaluation harnesses score a text), as vLLM's own server answers."""
    kwargs = dict(model=VLLM_MODEL, prompt="The gateway scores", max_tokens=0, echo=True, logprobs=1)
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        scored = [lp for part in parts for lp in part.token_logprobs]
        usage = chunks[-1].usage
    else:
        response = client.completions.create(**kwargs)
        text, usage = response.choices[0].text, response.usage
        assert response.choices[0].logprobs is not None
        scored = response.choices[0].logprobs.token_logprobs
    assert text == "The gateway scores"
    # (usage counts the one token vLLM's engine makes and drops, as vLLM's own server does)
    assert usage is not None and usage.prompt_tokens == len(scored)
    assert scored[0] is None and all(isinstance(lp, float) and lp <= 0 for lp in scored[1:])


def test_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=VLLM_MODEL, prompt="Hello", max_tokens=5, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5


@pytest.mark.parametrize("model", [VLLM_MODEL, "echo"])
def test_fields_sent_as_null_are_not_set(client: openai.OpenAI, model: str) -> None:
    """As clients that send every field send the unset ones: one choice of 16 tokens at most."""
    response = client.completions.create(model=model, prompt="Once upon a time", n=None, max_tokens=None)
    assert len(response.choices) == 1
    assert response.usage is not None and 1 <= response.usage.completion_tokens <= 16
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=None, max_tokens=2)
    assert len(chat.choices) == 1
