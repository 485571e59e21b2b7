"""A vLLM model's LoRA adapter served as a model of its own, by the base
model's replicas, on the real vLLM engine with the official SDK."""

from __future__ import annotations

import collections
from typing import Any

import anthropic
import httpx
import openai

from tests.integration.conftest import LORA, MODELS, VLLM_CONTEXT, VLLM_MODEL, Gateway

PROMPT = "Tell me about the harbour"


def test_the_adapter_is_listed_as_vllm_lists_it(client: openai.OpenAI, http: httpx.Client) -> None:
    card = http.get(f"/v1/models/{LORA}").json()
    assert (card["id"], card["parent"], card["root"]) == (LORA, VLLM_MODEL, str(MODELS / "tiny-chat-v1-lora"))
    assert (card["kind"], card["max_model_len"]) == ("llm", VLLM_CONTEXT)
    assert http.get(f"/v1/models/{VLLM_MODEL}").json()["parent"] is None
    assert LORA in [model.id for model in client.models.list()]


def test_the_adapter_changes_what_the_model_says(client: openai.OpenAI) -> None:
    said = {}
    for model in (VLLM_MODEL, LORA):
        raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        completion = raw.parse()
        assert (completion.model, raw.headers["x-gateway-variant"]) == (model, model)
        assert completion.usage is not None and completion.usage.completion_tokens > 0
        said[model] = completion.choices[0].text
    assert said[VLLM_MODEL] != said[LORA]
    again = client.completions.create(model=LORA, prompt=PROMPT, max_tokens=12, temperature=0)
    assert again.choices[0].text == said[LORA]  # the same adapter each time, not a mix of the two


def test_the_adapter_streams_chat_and_answers_the_responses_api(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    stream = client.chat.completions.create(
        model=LORA, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert {chunk.model for chunk in chunks} == {LORA}
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 8
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    first = client.responses.create(model=LORA, input=PROMPT, max_output_tokens=4)
    follow_up = client.responses.create(model=LORA, input="And?", previous_response_id=first.id, max_output_tokens=4)
    assert (first.model, follow_up.model) == (LORA, LORA)


def test_an_alias_splits_between_the_model_and_its_adapter(client: openai.OpenAI) -> None:
    seen = collections.Counter()
    for user in range(24):
        completion = client.completions.create(model="lora-ab", prompt=PROMPT, max_tokens=1, user=f"user-{user}")
        seen[completion.model] += 1
    assert set(seen) == {VLLM_MODEL, LORA}, seen


def test_the_adapter_answers_the_messages_api_and_counts_as_its_model(gateway: Gateway, http: httpx.Client) -> None:
    with anthropic.Anthropic(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60) as claude:
        message = claude.messages.create(model=LORA, max_tokens=4, messages=[{"role": "user", "content": PROMPT}])
    assert message.model == LORA and message.usage.output_tokens > 0
    counts = {}
    for model in (VLLM_MODEL, LORA):
        counts[model] = http.post("/tokenize", json={"model": model, "prompt": PROMPT}).json()["count"]
    assert counts[LORA] == counts[VLLM_MODEL] > 0  # the model's tokenizer
