"""Chat completions through the gateway with the official OpenAI SDK."""

from __future__ import annotations

import json

import openai
import pytest

from tests.integration.conftest import VLLM_MODEL

MESSAGES = [{"role": "user", "content": "Hello there, tell me about the harbour"}]
MODELS = [VLLM_MODEL, "echo"]


def collect(stream: openai.Stream) -> tuple[dict[int, str], dict[int, str | None], list]:
    """Per-choice text and finish reasons of a chat stream, and all chunks."""
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                assert choice.index not in finish, "finish_reason sent twice for one choice"
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


def chat(client: openai.OpenAI, stream: bool, **kwargs):
    """(text per choice, finish per choice, usage) whether streamed or not."""
    if stream:
        options = {"include_usage": True}
        texts, finish, chunks = collect(
            client.chat.completions.create(stream=True, stream_options=options, **kwargs)
        )
        return texts, finish, chunks[-1].usage
    response = client.chat.completions.create(**kwargs)
    texts = {c.index: c.message.content or "" for c in response.choices}
    finish = {c.index: c.finish_reason for c in response.choices}
    return texts, finish, response.usage


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_chat_answers_and_counts_usage(client: openai.OpenAI, model: str, stream: bool) -> None:
    texts, finish, usage = chat(client, stream, model=model, messages=MESSAGES, max_tokens=5)
    assert set(texts) == {0}
    assert texts[0]
    assert finish[0] in {"length", "stop"}
    assert usage.completion_tokens <= 5
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_a_stream_carries_usage_only_when_asked(client: openai.OpenAI, model: str) -> None:
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, stream=True))
    assert chunks
    # No usage anywhere, and no usage-only chunk (empty choices) a client did not ask for.
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert {chunk.model for chunk in chunks} == {model}


@pytest.mark.parametrize("budget", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("stream", [False, True])
def test_output_budget_is_honoured_exactly(client: openai.OpenAI, stream: bool, budget: str) -> None:
    _, finish, usage = chat(
        client,
        stream,
        model=VLLM_MODEL,
        messages=MESSAGES,
        extra_body={"ignore_eos": True},
        **{budget: 7},
    )
    assert usage.completion_tokens == 7
    assert finish[0] == "length"


@pytest.mark.parametrize("model", MODELS)
def test_streamed_text_equals_non_streamed_at_temperature_zero(
    client: openai.OpenAI, model: str
) -> None:
    kwargs = dict(model=model, messages=MESSAGES, max_tokens=24, temperature=0, seed=11)
    whole, whole_finish, whole_usage = chat(client, False, **kwargs)
    streamed, streamed_finish, streamed_usage = chat(client, True, **kwargs)
    assert streamed == whole
    assert streamed_finish == whole_finish
    assert streamed_usage.completion_tokens == whole_usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_seed_makes_sampling_reproducible(client: openai.OpenAI, stream: bool) -> None:
    kwargs = dict(model=VLLM_MODEL, messages=MESSAGES, max_tokens=24, temperature=1.0)
    first, _, _ = chat(client, stream, seed=1234, **kwargs)
    again, _, _ = chat(client, stream, seed=1234, **kwargs)
    assert first == again
    others = {chat(client, stream, seed=seed, **kwargs)[0][0] for seed in (1, 2, 3)}
    assert len(others | {first[0]}) > 1, "different seeds never changed the sample"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_n_returns_every_choice_each_finished(
    client: openai.OpenAI, model: str, stream: bool
) -> None:
    texts, finish, usage = chat(
        client, stream, model=model, messages=MESSAGES, max_tokens=6, n=2, temperature=1.0, seed=3
    )
    assert set(texts) == {0, 1}
    assert set(finish) == {0, 1}
    assert all(reason in {"length", "stop"} for reason in finish.values())
    assert usage.completion_tokens <= 12


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_with_top_logprobs(client: openai.OpenAI, stream: bool) -> None:
    kwargs = dict(
        model=VLLM_MODEL, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    if stream:
        entries = [
            entry
            for chunk in client.chat.completions.create(stream=True, **kwargs)
            for choice in chunk.choices
            if choice.logprobs and choice.logprobs.content
            for entry in choice.logprobs.content
        ]
    else:
        response = client.chat.completions.create(**kwargs)
        entries = response.choices[0].logprobs.content
    assert len(entries) == 4
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert len({top.token for top in entry.top_logprobs}) == 3
        assert all(top.logprob <= 0 for top in entry.top_logprobs)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_ends_the_answer(client: openai.OpenAI, stream: bool) -> None:
    base = dict(model=VLLM_MODEL, messages=MESSAGES, max_tokens=40, temperature=0, seed=5)
    full, _, _ = chat(client, stream, **base)
    text = full[0]
    # Two visible characters from the middle on: whatever text this host's
    # numerics produce, the stop string is one the answer contains.
    starts = [i for i in range(len(text) // 2, len(text) - 1) if text[i : i + 2].strip() == text[i : i + 2]]
    assert starts, f"answer too short to pick a stop string: {text!r}"
    stop = text[starts[0] : starts[0] + 2]
    cut, finish, _ = chat(client, stream, stop=[stop], **base)
    assert stop not in cut[0]
    assert text.startswith(cut[0])
    assert finish[0] == "stop"


CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Lima"]},
        "rank": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["city", "rank"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_format_is_enforced(client: openai.OpenAI, stream: bool) -> None:
    texts, finish, _ = chat(
        client,
        stream,
        model=VLLM_MODEL,
        messages=[{"role": "user", "content": "Give a city as JSON"}],
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
    )
    assert finish[0] == "stop"
    answer = json.loads(texts[0])
    assert set(answer) == {"city", "rank"}
    assert isinstance(answer["rank"], int)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        # As with OpenAI, `strict` asks for arguments that follow the schema.
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "function", "function": {"name": "get_weather"}}, "required"],
    ids=["named", "required"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_returns_a_schema_valid_tool_call(
    client: openai.OpenAI, tool_choice: object, stream: bool
) -> None:
    kwargs = dict(
        model=VLLM_MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice=tool_choice,
        max_tokens=200,
        temperature=0,
    )
    if stream:
        name, arguments = "", ""
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                for call in choice.delta.tool_calls or []:
                    name += call.function.name or ""
                    arguments += call.function.arguments or ""
    else:
        calls = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
        assert calls and len(calls) == 1
        name, arguments = calls[0].function.name, calls[0].function.arguments
    assert name == "get_weather"
    parsed = json.loads(arguments)
    assert set(parsed) == {"city"} and isinstance(parsed["city"], str)


def test_logit_bias_steers_the_first_token(client: openai.OpenAI) -> None:
    base = dict(model=VLLM_MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True)
    ids = {"return_tokens_as_token_ids": True}
    greedy = client.chat.completions.create(**base, extra_body=ids)
    first = greedy.choices[0].logprobs.content[0].token  # "token_id:N"
    banned = first.split(":")[1]
    steered = client.chat.completions.create(**base, logit_bias={banned: -100}, extra_body=ids)
    assert steered.choices[0].logprobs.content[0].token != first


def test_penalties_are_accepted_and_change_sampling(client: openai.OpenAI) -> None:
    # 30 tokens whatever the model prefers: a greedy tiny model repeats itself,
    # which strong penalties must change.
    base = dict(model=VLLM_MODEL, messages=MESSAGES, max_tokens=30, temperature=0,
                extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**base).choices[0].message.content
    penalised = client.chat.completions.create(
        **base, frequency_penalty=2.0, presence_penalty=2.0
    ).choices[0].message.content
    assert penalised != plain


async def test_async_client_chat(async_client: openai.AsyncOpenAI) -> None:
    response = await async_client.chat.completions.create(
        model=VLLM_MODEL, messages=MESSAGES, max_tokens=3
    )
    assert response.model == VLLM_MODEL
    stream = await async_client.chat.completions.create(
        model="echo", messages=MESSAGES, max_tokens=3, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello there, tell"
